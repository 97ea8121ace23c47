"""Secrets that sign things (media URLs, access tokens, webhook secrets): from a setting, or
generated once into the data dir.

Why a file when the setting is unset: ``make run`` restarts would otherwise invalidate what was
signed before (stored media URLs, webhook secrets receivers hold). Replicas need the setting:
each would generate a key of its own.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def keys(configured: str, data_dir: Path, file: str) -> list[bytes]:
    """The comma-separated secrets of a setting (newest first), or the data dir's one."""
    found = [k.strip().encode() for k in configured.split(",") if k.strip()]
    return found or [generated(Path(data_dir) / file)]


def generated(path: Path) -> bytes:
    """The key in ``path`` (generated, readable by its owner only, on first use)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # created with its final mode: never readable by others, not even for a moment
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process on the same data dir was first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()
