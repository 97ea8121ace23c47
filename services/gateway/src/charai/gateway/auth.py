"""Client tokens → tenants. Tokens are kept only as SHA-256 hashes and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from charai.core.errors import UnauthenticatedError
from pydantic import SecretStr

DEFAULT_TENANT = "default"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps a bearer token to its tenant; with no tokens configured every caller is ``default``."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._entries = [(_hash(token), tenant) for token, tenant in pairs]

    @classmethod
    def from_tokens(cls, tokens: Iterable[tuple[SecretStr, str]]) -> Authenticator:
        """From the parsed settings (``Settings.client_tokens``)."""
        return cls([(token.get_secret_value(), tenant) for token, tenant in tokens])

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def tenant_for(self, authorization: str) -> str:
        if not self._entries:
            return DEFAULT_TENANT
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("missing bearer token: send 'authorization: Bearer <token>'")
        presented = _hash(token.strip())
        found = ""
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        if not found:
            raise UnauthenticatedError("the bearer token is not valid")
        return found

    def grpc_check(self, metadata: dict[str, str], method: str) -> str:
        return self.tenant_for(metadata.get("authorization", ""))
