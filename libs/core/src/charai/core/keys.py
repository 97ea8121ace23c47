"""Secrets that sign things (media URLs, access tokens, webhook secrets): from a setting, or
generated once into the data dir.

Why a file when the setting is unset: ``make run`` restarts would otherwise invalidate what was
signed before (stored media URLs, webhook secrets receivers hold). Replicas need the setting:
each would generate a key of its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from charai.core.settings import refuse


def keys(configured: str, data_dir: Path, file: str) -> list[bytes]:
    """The comma-separated secrets of a setting (newest first), or the data dir's one."""
    found = [k.strip().encode() for k in configured.split(",") if k.strip()]
    return found or [generated(Path(data_dir) / file)]


def generated(path: Path) -> bytes:
    """The key in ``path`` (generated, readable by its owner only, on first use).

    Written whole to a file of its own and then linked into place, which fails if another
    process on the same data dir was first: the file is never seen empty or half written (it
    was created empty and then written, and a process that lost the race read it in between:
    its key was ``b""``, and anyone could sign media URLs with it). A key file left empty is
    refused, not used."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        # Created with its final mode: never readable by others, not even for a moment.
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process's key is the key
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    key = path.read_text().strip().encode()
    if not key:  # exit code 2, as for a bad setting
        refuse(f"{path}: the key file is empty; delete it to have a key generated, or set the key's setting")
    return key
