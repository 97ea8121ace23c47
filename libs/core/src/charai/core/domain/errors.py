"""Classification of provider outcomes: decided here, in one place (DESIGN.md section 4).

Workers turn an HTTP answer (or a transport failure) into a :class:`ProviderFailure`. Whether a
failure is retried, and how often, is a property of its :class:`ErrorKind`.
"""

from __future__ import annotations

import dataclasses
import enum


class ErrorKind(enum.IntEnum):
    """Values equal the proto's ErrorCode numbers."""

    PROVIDER_AUTH = 1
    CONTENT_REJECTED = 2
    INVALID_REQUEST = 3
    QUOTA_EXHAUSTED = 4
    RATE_LIMITED = 5
    PROVIDER_UNAVAILABLE = 6
    PROVIDER_TIMEOUT = 7
    PROVIDER_BAD_RESPONSE = 8
    WORKER_LOST = 9
    INTERNAL = 10

    @property
    def retryable(self) -> bool:
        return self in _RETRIES

    @property
    def max_retries(self) -> int:
        """Retries after the first attempt that this kind of failure allows."""
        return _RETRIES.get(self, 0)


_RETRIES: dict[ErrorKind, int] = {
    ErrorKind.RATE_LIMITED: 5,
    ErrorKind.PROVIDER_UNAVAILABLE: 3,
    ErrorKind.PROVIDER_TIMEOUT: 3,
    ErrorKind.PROVIDER_BAD_RESPONSE: 2,
    ErrorKind.WORKER_LOST: 2,
    ErrorKind.INTERNAL: 1,
}

AUTH_CODES = frozenset({"1000", "1001", "1002", "1003", "1004", "1005", "1220"})
CONTENT_CODES = frozenset({"1301"})
QUOTA_CODES = frozenset(
    {"1113", "1304", "1308", "1309", "1310", "1311", *(str(c) for c in range(1313, 1322))}
)
RATE_CODES = frozenset({"1302", "1303", "1305"})
SERVER_CODES = frozenset({"1200", "1230", "1234"})
OPENAI_CONTENT = frozenset({"content_policy_violation", "moderation_blocked"})
#: OpenAI's error codes (``error.code`` or ``error.type``) by meaning; they decide whatever the
#: status a compatible server sends them with.
OPENAI_AUTH = frozenset({"invalid_api_key", "invalid_organization", "unsupported_country_region_territory"})
OPENAI_QUOTA = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
OPENAI_RATE = frozenset({"rate_limit_exceeded"})


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderFailure:
    """One failed provider call, classified."""

    kind: ErrorKind
    message: str
    http_status: int = 0
    provider_code: str = ""
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind.retryable


def classify_http(
    status: int,
    code: str,
    message: str,
    *,
    error_type: str = "",
    retry_after: float | None = None,
    key_setting: str = "the provider API key setting",
) -> ProviderFailure:
    """Classifies a non-2xx answer from Zhipu or an OpenAI-compatible API (DESIGN.md section 4).

    The body's code decides before the status where it is specific (Zhipu's numeric codes,
    OpenAI's words such as ``invalid_api_key``, ``insufficient_quota``, ``rate_limit_exceeded``,
    ``content_policy_violation``): a 429 is a quota or a rate limit only by its code.

    Args:
        status: HTTP status.
        code: ``error.code`` of the body (Zhipu numeric string or OpenAI word), "" if none.
        message: ``error.message`` of the body, kept for the user (never contains our key).
        error_type: OpenAI's ``error.type``, "" if none.
        retry_after: seconds from ``Retry-After`` / ``retry-after-ms``, if sent.
        key_setting: the setting an operator must check when the key is refused.
    """
    words = {code, error_type}
    if status in (401, 403) or code in AUTH_CODES or words & OPENAI_AUTH:
        text = f"the provider refused the API key ({message or status}); check {key_setting}"
        return ProviderFailure(ErrorKind.PROVIDER_AUTH, text, status, code)
    if code in CONTENT_CODES or words & OPENAI_CONTENT:
        return ProviderFailure(ErrorKind.CONTENT_REJECTED, message or "content rejected", status, code)
    if status == 429 or code in RATE_CODES or code in QUOTA_CODES or words & (OPENAI_QUOTA | OPENAI_RATE):
        if code in QUOTA_CODES or words & OPENAI_QUOTA:
            text = message or "the provider account has no balance or quota left"
            return ProviderFailure(ErrorKind.QUOTA_EXHAUSTED, text, status, code)
        text = message or "rate limited by the provider"
        return ProviderFailure(ErrorKind.RATE_LIMITED, text, status, code, retry_after)
    if status >= 500 or code in SERVER_CODES or status in (408, 409):
        text = message or f"the provider failed with HTTP {status}"
        return ProviderFailure(ErrorKind.PROVIDER_UNAVAILABLE, text, status, code, retry_after)
    if 400 <= status < 500:
        return ProviderFailure(ErrorKind.INVALID_REQUEST, message or f"HTTP {status}", status, code)
    return ProviderFailure(
        ErrorKind.PROVIDER_BAD_RESPONSE, message or f"unexpected HTTP {status}", status, code
    )


def timeout(seconds: float) -> ProviderFailure:
    return ProviderFailure(ErrorKind.PROVIDER_TIMEOUT, f"the provider did not answer within {seconds:g} s")


def unreachable(reason: str) -> ProviderFailure:
    return ProviderFailure(ErrorKind.PROVIDER_UNAVAILABLE, f"could not reach the provider: {reason}")


def storage_unavailable(reason: str) -> ProviderFailure:
    """The generated media could not be stored (charai's media store, e.g. NATS re-electing a
    leader): transient, so the attempt is retried like an unreachable provider."""
    return ProviderFailure(
        ErrorKind.PROVIDER_UNAVAILABLE, f"could not store the generated media: {reason}; it will be retried"
    )


def bad_response(reason: str, status: int = 200, code: str = "") -> ProviderFailure:
    return ProviderFailure(
        ErrorKind.PROVIDER_BAD_RESPONSE, f"the provider sent a bad response: {reason}", status, code
    )


def parse_retry_after(value: str | None, value_ms: str | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds; dates are ignored)."""
    for raw, scale in ((value_ms, 1000.0), (value, 1.0)):
        if raw:
            try:
                seconds = float(raw) / scale
            except ValueError:
                continue
            if seconds >= 0:
                return min(seconds, 600.0)
    return None
