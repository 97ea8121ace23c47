"""Client tokens → tenants. Tokens are kept only as SHA-256 hashes and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from charai.core.errors import UnauthenticatedError

DEFAULT_TENANT = "default"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps a bearer token to its tenant; with no tokens configured every caller is ``default``."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._entries = [(_hash(token), tenant) for token, tenant in pairs]

    @classmethod
    def from_settings(cls, inline: str, file: Path | None) -> Authenticator:
        lines = [part for part in inline.split(",")]
        if file is not None:
            try:
                lines += file.read_text().splitlines()
            except OSError as exc:
                raise SystemExit(f"gateway: cannot read CHARAI_API_KEYS_FILE ({exc.strerror})") from None
        pairs = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            token, sep, tenant = line.partition("=")
            if not sep or not token.strip() or not tenant.strip():
                raise SystemExit("gateway: CHARAI_API_KEYS entries must look like token=tenant")
            pairs.append((token.strip(), tenant.strip()))
        return cls(pairs)

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


def is_loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
