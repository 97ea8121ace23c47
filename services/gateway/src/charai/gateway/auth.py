"""Bearer tokens → tenants: tenant API keys (kept only as SHA-256 hashes, compared in constant
time) and scoped access tokens (verified by their signature; :mod:`charai.gateway.tokens`).

An access token makes the call's :data:`charai.gateway.access.current` the token, so the servicer
holds the call to the token's scope; a tenant key leaves it None.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from charai.core.errors import UnauthenticatedError
from charai.gateway import access
from charai.gateway.tokens import AccessTokens, looks_like_access_token
from pydantic import SecretStr

DEFAULT_TENANT = "default"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps a bearer token to its tenant; with no API keys configured every caller is
    ``default`` (an access token, which carries its tenant, is still honoured with its scope)."""

    def __init__(self, pairs: list[tuple[str, str]], tokens: AccessTokens | None = None) -> None:
        self._entries = [(_hash(token), tenant) for token, tenant in pairs]
        self._tokens = tokens

    @classmethod
    def from_tokens(
        cls, tokens: Iterable[tuple[SecretStr, str]], access_tokens: AccessTokens | None = None
    ) -> Authenticator:
        """From the parsed settings (``Settings.client_tokens``) and the access-token keys."""
        return cls([(token.get_secret_value(), tenant) for token, tenant in tokens], access_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def tenant_for(self, authorization: str) -> str:
        access.current.set(None)
        scheme, _, bearer = authorization.partition(" ")
        bearer = bearer.strip()
        if self._tokens is not None and scheme.lower() == "bearer" and looks_like_access_token(bearer):
            verified = self._tokens.verify(bearer)
            access.current.set(verified)
            return verified.tenant
        if not self._entries:
            return DEFAULT_TENANT
        if scheme.lower() != "bearer" or not bearer:
            raise UnauthenticatedError("missing bearer token: send 'authorization: Bearer <token>'")
        presented = _hash(bearer)
        found = ""
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        if not found:
            raise UnauthenticatedError("the bearer token is not valid")
        return found

    def grpc_check(self, metadata: dict[str, str], method: str) -> str:
        return self.tenant_for(metadata.get("authorization", ""))
