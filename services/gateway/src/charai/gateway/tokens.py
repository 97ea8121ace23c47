"""Scoped access tokens: what a backend hands to one browser instead of its tenant key.

A token is a JWT (RFC 7519, via PyJWT) signed with HS256 by a key only the gateways know, so
every gateway replica verifies it without asking anyone (no store round trip). Following RFC 8725:
an explicit ``typ`` header, one allowed algorithm (never the header's ``alg``), a fixed audience
and issuer, and ``exp`` checked against the gateway's own clock. Keys rotate: the first key signs,
every listed key verifies (``kid`` says which), so tokens signed by the previous key stay valid
while it is still listed.

Its scope is small on purpose: the tasks it names (``task_ids``), the tasks whose metadata has
every pair of ``metadata`` (e.g. ``characterId=char_001``), and with ``allow_create`` the right to
create tasks inside that metadata scope. Everything else (queue statistics, re-runs, deletes,
more tokens) needs the tenant key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jwt
from charai.core.clock import SYSTEM, Clock
from charai.core.domain import reach
from charai.core.errors import UnauthenticatedError

#: The JOSE ``typ`` of a charai access token (RFC 8725 §3.11: explicit typing).
TOKEN_TYPE = "charai-at+jwt"  # noqa: S105 - a media type, not a secret
AUDIENCE = "charai-tasks"
ISSUER = "charai"
ALGORITHM = "HS256"
#: Lifetime when the request names none.
DEFAULT_TTL_SECONDS = 15 * 60
#: The longest lifetime a token may be given (``CHARAI_ACCESS_TOKEN_MAX_TTL_SECONDS``).
DEFAULT_MAX_TTL_SECONDS = 24 * 3600


class AccessTokenError(UnauthenticatedError):
    """A token that is not (or no longer) valid; ``reason`` says which, for ErrorInfo."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    """What an access token reaches."""

    task_ids: frozenset[str] = frozenset()
    metadata: tuple[tuple[str, str], ...] = ()
    allow_create: bool = False

    @classmethod
    def of(cls, task_ids: Iterable[str], metadata: Mapping[str, str], allow_create: bool) -> Scope:
        return cls(frozenset(task_ids), tuple(sorted(metadata.items())), allow_create)

    @property
    def pairs(self) -> dict[str, str]:
        return dict(self.metadata)

    def matches(self, metadata: Mapping[str, str]) -> bool:
        """Whether a task with ``metadata`` lies inside the metadata scope."""
        return reach.matches(self.metadata, metadata)

    def reaches(self, task_id: str, metadata: Mapping[str, str]) -> bool:
        return reach.reaches(self.task_ids, self.metadata, task_id, metadata)

    def may_create(self, metadata: Mapping[str, str]) -> bool:
        return self.allow_create and self.matches(metadata)


@dataclasses.dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified token: whose it is, what it reaches, until when."""

    tenant: str
    scope: Scope
    expires_at: float
    token_id: str


def expired_error() -> AccessTokenError:
    return AccessTokenError(
        "the access token has expired: ask your backend for a new one", "ACCESS_TOKEN_EXPIRED"
    )


def looks_like_access_token(bearer: str) -> bool:
    """A JWT (three base64url parts, the header starting ``{"``) rather than an API key."""
    return bearer.startswith("eyJ") and bearer.count(".") == 2


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


class AccessTokens:
    """Issues and verifies access tokens with a list of keys (the first one signs)."""

    def __init__(self, keys: Sequence[bytes], max_ttl_seconds: float, clock: Clock = SYSTEM) -> None:
        if not keys:
            raise ValueError("access tokens need at least one signing key")
        self._signing = keys[0]
        self._keys = {key_id(k): k for k in keys}
        self._max_ttl = max_ttl_seconds
        self._clock = clock

    @property
    def max_ttl_seconds(self) -> float:
        return self._max_ttl

    def issue(self, tenant: str, scope: Scope, ttl_seconds: float) -> tuple[str, float]:
        """A token for ``tenant`` reaching ``scope`` for ``ttl_seconds``; and its expiry (Unix s)."""
        now = self._clock.time()
        expires = now + ttl_seconds
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": tenant,
            "iat": int(now),
            "exp": expires,
            "jti": uuid.uuid4().hex,
            "scope": {
                "tasks": sorted(scope.task_ids),
                "metadata": scope.pairs,
                "create": scope.allow_create,
            },
        }
        headers = {"typ": TOKEN_TYPE, "kid": key_id(self._signing)}
        return jwt.encode(claims, self._signing, algorithm=ALGORITHM, headers=headers), expires

    def expired(self, token: AccessToken) -> bool:
        """Whether a token verified earlier has expired since (open streams end then)."""
        return token.expires_at <= self._clock.time()

    def verify(self, token: str) -> AccessToken:
        """The token's tenant and scope; :class:`AccessTokenError` when it is not valid now."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AccessTokenError("the access token is malformed", "ACCESS_TOKEN_INVALID") from None
        key = self._keys.get(str(header.get("kid", "")))
        if header.get("typ") != TOKEN_TYPE or key is None:
            raise AccessTokenError("the access token was not issued by this service", "ACCESS_TOKEN_INVALID")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                # exp and iat: checked against this gateway's clock (injected: tests move it).
                options={"require": ["exp", "sub", "scope"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError:
            raise AccessTokenError("the access token is not valid", "ACCESS_TOKEN_INVALID") from None
        expires = float(claims["exp"])
        if expires <= self._clock.time():
            raise expired_error()
        raw = claims["scope"]
        scope = Scope.of(raw.get("tasks", ()), raw.get("metadata", {}), bool(raw.get("create", False)))
        return AccessToken(str(claims["sub"]), scope, expires, str(claims.get("jti", "")))
