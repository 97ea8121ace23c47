"""The secret that signs media URLs: ``CHARAI_MEDIA_SIGNING_KEY``, or one kept in the data dir.

Why a file when the setting is unset: ``make run`` restarts would otherwise invalidate every media
URL handed out before (apps store them, as the seed stores ``result.imageUrl``). Replicas behind
one load balancer need the setting: each would generate a key of its own.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from charai.core.media import UrlSigner
from charai.gateway.settings import Settings

#: The generated key's file, inside ``CHARAI_DATA_DIR``.
KEY_FILE = "media-signing.key"


def media_signing_key(settings: Settings) -> bytes:
    """The setting's value, or the data dir's key (generated, readable by its owner only, on
    first use)."""
    if configured := settings.media_signing_key.get_secret_value():
        return configured.encode()
    path = Path(settings.data_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # created with its final mode: never readable by others, not even for a moment
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another gateway on the same data dir was first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def url_signer(settings: Settings) -> UrlSigner:
    """Signs and checks media URLs with :func:`media_signing_key` and the configured lifetime."""
    return UrlSigner(media_signing_key(settings), settings.media_url_ttl_seconds)
