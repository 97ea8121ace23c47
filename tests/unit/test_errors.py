"""Pure tests of provider-outcome classification (charai.core.domain.errors, DESIGN.md section 4)."""

from __future__ import annotations

import pytest
from charai.core.domain import errors
from charai.core.domain.errors import ErrorKind, ProviderFailure, classify_http, parse_retry_after
from charai.tasks.v1 import task_pb2
from hypothesis import given
from hypothesis import strategies as st

K = ErrorKind
KEY = "CHARAI_IMAGE_API_KEY"

# (http status, error.code, error.type, expected kind) — one row per case the table names.
TABLE: list[tuple[int, str, str, ErrorKind]] = [
    # 401/403, Zhipu 1000-1005, 1220: bad or missing key.
    (401, "", "", K.PROVIDER_AUTH),
    (403, "", "", K.PROVIDER_AUTH),
    *[(401, str(code), "", K.PROVIDER_AUTH) for code in range(1000, 1006)],
    (403, "1220", "", K.PROVIDER_AUTH),
    (401, "invalid_api_key", "invalid_request_error", K.PROVIDER_AUTH),  # OpenAI
    # 400 + 1301 or OpenAI content policy.
    (400, "1301", "", K.CONTENT_REJECTED),
    (400, "content_policy_violation", "invalid_request_error", K.CONTENT_REJECTED),
    (400, "", "content_policy_violation", K.CONTENT_REJECTED),
    (400, "moderation_blocked", "image_generation_user_error", K.CONTENT_REJECTED),
    # Other 400s.
    *[(400, str(code), "", K.INVALID_REQUEST) for code in (1210, 1211, 1212, 1213, 1214, 1215, 1261)],
    (400, "", "", K.INVALID_REQUEST),
    (400, "invalid_value", "invalid_request_error", K.INVALID_REQUEST),  # OpenAI
    (404, "", "", K.INVALID_REQUEST),
    (422, "", "", K.INVALID_REQUEST),
    # 429 + 1113 / insufficient_quota: retrying cannot help.
    (429, "1113", "", K.QUOTA_EXHAUSTED),
    (429, "insufficient_quota", "insufficient_quota", K.QUOTA_EXHAUSTED),
    (429, "insufficient_quota", "", K.QUOTA_EXHAUSTED),
    (429, "", "insufficient_quota", K.QUOTA_EXHAUSTED),
    # Zhipu daily/usage/plan quotas (reference/zhipu-api.md section 3): not retryable either.
    *[(429, str(code), "", K.QUOTA_EXHAUSTED) for code in (1304, 1308, 1309, 1310, 1311, *range(1313, 1322))],
    # 429 + 1302/1303/1305 / rate_limit_exceeded: retry with backoff.
    (429, "1302", "", K.RATE_LIMITED),
    (429, "1303", "", K.RATE_LIMITED),
    (429, "1305", "", K.RATE_LIMITED),
    (429, "rate_limit_exceeded", "requests", K.RATE_LIMITED),
    (429, "rate_limit_exceeded", "tokens", K.RATE_LIMITED),
    # 5xx and 1200/1230/1234.
    (500, "", "", K.PROVIDER_UNAVAILABLE),
    (502, "", "", K.PROVIDER_UNAVAILABLE),
    (503, "", "", K.PROVIDER_UNAVAILABLE),
    (504, "", "", K.PROVIDER_UNAVAILABLE),
    (500, "1200", "", K.PROVIDER_UNAVAILABLE),
    (500, "1230", "", K.PROVIDER_UNAVAILABLE),
    (500, "1234", "", K.PROVIDER_UNAVAILABLE),
    (500, "server_error", "server_error", K.PROVIDER_UNAVAILABLE),  # OpenAI
    # What OpenAI's SDK also retries.
    (408, "", "", K.PROVIDER_UNAVAILABLE),
    (409, "", "", K.PROVIDER_UNAVAILABLE),
]


def row_id(row: tuple[int, str, str, ErrorKind]) -> str:
    status, code, error_type, kind = row
    return f"{status}-{code or '_'}-{error_type or '_'}-{kind.name}"


@pytest.mark.parametrize("row", TABLE, ids=[row_id(r) for r in TABLE])
def test_classification_table(row: tuple[int, str, str, ErrorKind]) -> None:
    status, code, error_type, kind = row
    failure = classify_http(status, code, "provider says no", error_type=error_type, key_setting=KEY)
    assert failure.kind is kind
    assert failure.http_status == status
    assert failure.provider_code == code
    assert failure.retryable is kind.retryable
    if kind is K.PROVIDER_AUTH:
        assert KEY in failure.message, "the operator must be told which setting to check"
        assert "provider says no" in failure.message
    else:
        assert failure.message == "provider says no", "the provider's message is kept for the user"


@pytest.mark.parametrize(
    ("kind", "retryable"),
    [
        (K.PROVIDER_AUTH, False),
        (K.CONTENT_REJECTED, False),
        (K.INVALID_REQUEST, False),
        (K.QUOTA_EXHAUSTED, False),
        (K.RATE_LIMITED, True),
        (K.PROVIDER_UNAVAILABLE, True),
        (K.PROVIDER_TIMEOUT, True),
        (K.PROVIDER_BAD_RESPONSE, True),
    ],
)
def test_fail_at_once_or_retry(kind: ErrorKind, retryable: bool) -> None:
    assert kind.retryable is retryable
    assert (kind.max_retries > 0) is retryable


def test_error_kinds_match_proto_error_codes() -> None:
    for kind in ErrorKind:
        assert task_pb2.ErrorCode.Value(f"ERROR_CODE_{kind.name}") == kind.value
    assert len(ErrorKind) == len(task_pb2.ErrorCode.keys()) - 1  # minus UNSPECIFIED


@pytest.mark.parametrize("code", ["1302", "1303", "1305", "rate_limit_exceeded"])
def test_rate_limited_keeps_retry_after(code: str) -> None:
    failure = classify_http(429, code, "slow down", retry_after=12.5)
    assert failure.kind is K.RATE_LIMITED
    assert failure.retry_after == 12.5


@pytest.mark.parametrize("status", [500, 502, 503])
def test_unavailable_keeps_retry_after(status: int) -> None:
    assert classify_http(status, "", "", retry_after=7.0).retry_after == 7.0


@pytest.mark.parametrize(("status", "code"), [(429, "1113"), (401, ""), (400, "1301"), (400, "1214")])
def test_fail_at_once_kinds_drop_retry_after(status: int, code: str) -> None:
    assert classify_http(status, code, "", retry_after=5.0).retry_after is None


def test_auth_message_without_provider_message_names_status_and_default_setting() -> None:
    failure = classify_http(401, "", "")
    assert failure.kind is K.PROVIDER_AUTH
    assert "401" in failure.message
    assert "API key" in failure.message


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "1301", K.CONTENT_REJECTED),
        (400, "1214", K.INVALID_REQUEST),
        (429, "1113", K.QUOTA_EXHAUSTED),
        (429, "1302", K.RATE_LIMITED),
        (503, "", K.PROVIDER_UNAVAILABLE),
        (302, "", K.PROVIDER_BAD_RESPONSE),
    ],
)
def test_empty_provider_message_gets_a_default(status: int, code: str, kind: ErrorKind) -> None:
    failure = classify_http(status, code, "")
    assert failure.kind is kind
    assert failure.message.strip()


def test_unexpected_status_is_a_bad_response() -> None:
    failure = classify_http(302, "", "")
    assert failure.kind is K.PROVIDER_BAD_RESPONSE
    assert "302" in failure.message


codes = st.sampled_from(
    ["", "1000", "1113", "1211", "1220", "1234", "1301", "1302", "1305", "1310", "insufficient_quota"]
) | st.text(max_size=30)


@given(st.integers(100, 599), codes, st.text(max_size=50), codes, st.none() | st.floats(0, 600))
def test_classify_http_is_total(
    status: int, code: str, message: str, error_type: str, retry_after: float | None
) -> None:
    failure = classify_http(
        status, code, message, error_type=error_type, retry_after=retry_after, key_setting=KEY
    )
    assert isinstance(failure, ProviderFailure)
    assert failure.message  # never empty, even when the provider sent none
    if status in (401, 403) or code in errors.AUTH_CODES:
        assert failure.kind is K.PROVIDER_AUTH  # a refused key always wins: nothing else can help
    if failure.retry_after is not None:
        assert failure.kind in (K.RATE_LIMITED, K.PROVIDER_UNAVAILABLE)
    if failure.kind is K.QUOTA_EXHAUSTED:
        assert not failure.retryable


def test_timeout() -> None:
    failure = errors.timeout(30.0)
    assert failure.kind is K.PROVIDER_TIMEOUT
    assert failure.retryable
    assert failure.kind.max_retries == 3
    assert "30 s" in failure.message
    assert "2.5 s" in errors.timeout(2.5).message


def test_unreachable() -> None:
    failure = errors.unreachable("connection refused")
    assert failure.kind is K.PROVIDER_UNAVAILABLE
    assert failure.retryable
    assert "connection refused" in failure.message


def test_bad_response() -> None:
    failure = errors.bad_response("not base64")
    assert failure.kind is K.PROVIDER_BAD_RESPONSE
    assert failure.retryable
    assert failure.kind.max_retries in (1, 2), "once or twice, then fail"
    assert failure.http_status == 200
    assert "not base64" in failure.message
    other = errors.bad_response("json error body", status=200, code="1234")
    assert other.provider_code == "1234"


@pytest.mark.parametrize(
    ("value", "value_ms", "expected"),
    [
        (None, None, None),
        ("", "", None),
        ("5", None, 5.0),
        ("0", None, 0.0),
        ("1.5", None, 1.5),
        (None, "1500", 1.5),
        ("9", "250", 0.25),  # retry-after-ms is the more precise of the two
        ("9", "soon", 9.0),  # a bad ms header falls back to seconds
        ("Wed, 21 Oct 2015 07:28:00 GMT", None, None),  # dates are ignored
        ("-3", None, None),
        ("nan", None, None),
        ("7200", None, 600.0),  # capped
        ("inf", None, 600.0),
    ],
)
def test_parse_retry_after(value: str | None, value_ms: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, value_ms) == expected


@given(st.none() | st.text(max_size=20), st.none() | st.text(max_size=20))
def test_parse_retry_after_is_total_and_bounded(value: str | None, value_ms: str | None) -> None:
    result = parse_retry_after(value, value_ms)
    assert result is None or 0.0 <= result <= 600.0


@given(st.floats(0, 10_000, allow_nan=False))
def test_parse_retry_after_round_trips_seconds(seconds: float) -> None:
    assert parse_retry_after(repr(seconds)) == min(seconds, 600.0)
