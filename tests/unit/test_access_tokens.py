"""Scoped access tokens (charai.gateway.tokens) on their own, on a clock the test moves."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from charai.core.clock import ManualClock
from charai.gateway.settings import Settings
from charai.gateway.signing import access_tokens
from charai.gateway.tokens import AccessTokenError, AccessTokens, Scope, key_id, looks_like_access_token
from pydantic import SecretStr, ValidationError

KEY = b"k" * 32
OLD = b"o" * 32


def tokens(clock: ManualClock, *keys: bytes) -> AccessTokens:
    return AccessTokens(list(keys) or [KEY], max_ttl_seconds=86_400, clock=clock)


def test_a_token_carries_its_tenant_and_scope_until_it_expires() -> None:
    clock = ManualClock()
    issuer = tokens(clock)
    scope = Scope.of(["task_1"], {"characterId": "char_001"}, allow_create=True)
    token, expires = issuer.issue("acme", scope, 900)
    assert looks_like_access_token(token)
    assert expires == clock.time() + 900
    verified = issuer.verify(token)
    assert (verified.tenant, verified.scope, verified.expires_at) == ("acme", scope, expires)
    clock.advance(899)
    issuer.verify(token)
    clock.advance(1)
    with pytest.raises(AccessTokenError) as err:
        issuer.verify(token)
    assert err.value.reason == "ACCESS_TOKEN_EXPIRED"


def test_scope_reaches_named_tasks_and_matching_metadata_only() -> None:
    scope = Scope.of(["task_1"], {"characterId": "char_001"}, allow_create=True)
    assert scope.reaches("task_1", {})
    assert scope.reaches("task_9", {"characterId": "char_001", "viewType": "front"})
    assert not scope.reaches("task_9", {"characterId": "char_002"})
    assert scope.may_create({"characterId": "char_001", "viewType": "side"})
    assert not scope.may_create({"characterId": "char_002"})
    only_ids = Scope.of(["task_1"], {}, allow_create=True)
    assert not only_ids.reaches("task_2", {"characterId": "char_001"})
    assert not only_ids.may_create({})  # creating needs a metadata scope to land in
    assert not Scope.of([], {"characterId": "c"}, allow_create=False).may_create({"characterId": "c"})


def test_rotation_keeps_tokens_of_a_listed_old_key_valid() -> None:
    clock = ManualClock()
    old_token, _ = tokens(clock, OLD).issue("acme", Scope.of(["t"], {}, False), 600)
    rotated = tokens(clock, KEY, OLD)
    assert rotated.verify(old_token).tenant == "acme"
    new_token, _ = rotated.issue("acme", Scope.of(["t"], {}, False), 600)
    assert jwt.get_unverified_header(new_token)["kid"] == key_id(KEY)
    with pytest.raises(AccessTokenError):
        tokens(clock, KEY).verify(old_token)  # the old key dropped: its tokens end with it


def _forge(header: dict[str, object], claims: dict[str, object], key: bytes, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=header)


@pytest.mark.parametrize(
    "case",
    [
        "wrong key",
        "no typ",
        "other audience",
        "other issuer",
        "alg none",
        "tampered",
        "garbage",
        "unknown kid",
    ],
)
def test_forged_or_foreign_tokens_are_refused(case: str) -> None:
    clock = ManualClock()
    issuer = tokens(clock)
    good, _ = issuer.issue("acme", Scope.of([], {"characterId": "c"}, True), 600)
    claims = jwt.decode(
        good, KEY, algorithms=["HS256"], audience="charai-tasks", options={"verify_signature": False}
    )
    header: dict[str, object] = {"typ": "charai-at+jwt", "kid": key_id(KEY)}
    forgeries: dict[str, Callable[[], str]] = {
        "wrong key": lambda: _forge(header, claims, b"x" * 32),
        "no typ": lambda: _forge({"kid": key_id(KEY)}, claims, KEY),
        "other audience": lambda: _forge(header, {**claims, "aud": "billing"}, KEY),
        "other issuer": lambda: _forge(header, {**claims, "iss": "someone"}, KEY),
        "alg none": lambda: jwt.encode(claims, None, algorithm="none", headers=header),
        "tampered": lambda: _tamper(good),
        "garbage": lambda: "eyJ.not.a-token",
        "unknown kid": lambda: _forge({**header, "kid": "nope"}, claims, KEY),
    }
    forged = forgeries[case]()
    with pytest.raises(AccessTokenError) as err:
        issuer.verify(forged)
    assert err.value.reason == "ACCESS_TOKEN_INVALID"


def _tamper(token: str) -> str:
    """The same token with its scope widened (signature left as it was)."""
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["scope"]["metadata"] = {}
    claims["scope"]["tasks"] = ["*"]
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{head}.{raw}.{sig}"


def test_keys_come_from_the_setting_or_are_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    clock = ManualClock()
    scope = Scope.of(["task_1"], {}, allow_create=False)
    new, old = "n" * 32, "o" * 40
    configured = access_tokens(
        Settings(data_dir=tmp_path, access_token_keys=SecretStr(f"{new}, {old}")), clock
    )
    old_token, _ = tokens(clock, old.encode()).issue("acme", scope, 600)
    assert configured.verify(old_token).tenant == "acme"  # the old key still verifies
    new_token, _ = configured.issue("acme", scope, 600)
    assert jwt.get_unverified_header(new_token)["kid"] == key_id(new.encode())  # the first one signs
    with pytest.raises(ValidationError, match="at least 32 characters") as err:
        Settings(data_dir=tmp_path, access_token_keys=SecretStr("short-secret-key"))
    assert "short-secret-key" not in str(err.value)
    first = access_tokens(Settings(data_dir=tmp_path), clock)
    token, _ = first.issue("acme", scope, 600)
    assert access_tokens(Settings(data_dir=tmp_path), clock).verify(token).tenant == "acme"  # kept
    assert (tmp_path / "access-token.key").stat().st_mode & 0o777 == 0o600
