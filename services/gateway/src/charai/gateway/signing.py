"""The secrets that sign media URLs and access tokens: from the settings, or kept in the data dir.

Why a file when the setting is unset: ``make run`` restarts would otherwise invalidate every media
URL handed out before (apps store them, as the seed stores ``result.imageUrl``). Replicas behind
one load balancer need the setting: each would generate a key of its own.
"""

from __future__ import annotations

from charai.core.clock import SYSTEM, Clock
from charai.core.keys import keys
from charai.core.media import UrlSigner
from charai.gateway.settings import Settings
from charai.gateway.tokens import AccessTokens

#: The generated key's file, inside ``CHARAI_DATA_DIR``.
KEY_FILE = "media-signing.key"


#: The generated access-token key's file, inside ``CHARAI_DATA_DIR``.
TOKEN_KEY_FILE = "access-token.key"  # noqa: S105 - a file name, not a secret


def media_signingkeys(settings: Settings) -> list[bytes]:
    """``CHARAI_MEDIA_SIGNING_KEY`` (comma-separated: the first signs, all verify), or the data
    dir's key."""
    return keys(settings.media_signing_key.get_secret_value(), settings.data_dir, KEY_FILE)


def url_signer(settings: Settings) -> UrlSigner:
    """Signs and checks media URLs with :func:`media_signing_keys` and the configured lifetime."""
    return UrlSigner(media_signingkeys(settings), settings.media_url_ttl)


def access_tokens(settings: Settings, clock: Clock = SYSTEM) -> AccessTokens:
    """Issues and verifies access tokens with ``CHARAI_ACCESS_TOKEN_KEYS`` (or the data dir's key)."""
    found = keys(settings.access_token_keys.get_secret_value(), settings.data_dir, TOKEN_KEY_FILE)
    return AccessTokens(found, settings.access_token_max_ttl_seconds, clock)
