"""Reading a provider's ``200`` JSON answer defensively: in-band errors and base64 media.

Zhipu sometimes answers ``200`` with ``{"error": {...}}``. DESIGN.md section 4 makes such an
answer to a synchronous call PROVIDER_BAD_RESPONSE (retried once or twice, then failed), keeping
the provider's code and message; the FAIL status of an *async* image job is the provider's own
verdict on the job and is classified by its code (:func:`classify_error_body`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from charai.core.domain import errors
from charai.core.domain.breaker import OPENING_KINDS
from charai.core.domain.errors import ErrorKind, ProviderFailure
from charai.worker.http import ProviderHttp
from charai.worker.provider import ProviderError, Response

INVALID_CODES = frozenset({"1210", "1211", "1212", "1213", "1214", "1215", "1221", "1222", "1261"})
"""Zhipu codes that come with HTTP 400 (bad parameter, unknown model, prompt too long)."""


def json_object(response: Response) -> dict[str, Any]:
    """The answer's JSON object; anything else (not JSON, a list, a string) is a bad response."""
    body = response.json()
    if not isinstance(body, dict):
        raise ProviderError(errors.bad_response(f"expected a JSON object, got {type(body).__name__}"))
    return body


def classify_error_body(error: Any, *, key_setting: str, status: int = 200) -> ProviderFailure:
    """Classifies an ``{"code", "message"}`` error (Zhipu's, or OpenAI's with ``type``) carried
    inside a ``200`` answer.

    The code decides, as it would for an HTTP error: codes of Zhipu's 400 family are classified
    as if the status were 400 (retrying a bad parameter cannot help), and a code that is itself
    an HTTP error status (Zhipu sends ``"500"`` for internal errors) as that status. An error
    without a known code is a bad response (retried a little, then failed).

    Args:
        error: The value of the body's ``error`` field (normally a dict).
        key_setting: The setting to name if the code says the key was refused.
        status: The HTTP status the answer came with.
    """
    code, message, error_type = "", "", ""
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        message = str(error.get("message") or "")[:500]
        error_type = str(error.get("type") or "")  # OpenAI's envelope
    elif isinstance(error, str):
        message = error[:500]
    effective = status
    if code in INVALID_CODES:
        effective = 400
    elif len(code) == 3 and code.isdigit() and 400 <= int(code) < 600:
        effective = int(code)
    failure = errors.classify_http(effective, code, message, error_type=error_type, key_setting=key_setting)
    if failure.kind is ErrorKind.PROVIDER_BAD_RESPONSE:
        detail = f"an error inside a {status} answer (code {code or 'none'}: {message or 'no message'})"
        return errors.bad_response(detail, status, code)
    return ProviderFailure(failure.kind, failure.message, status, code, failure.retry_after)


def raise_inband_error(body: dict[str, Any], provider: ProviderHttp) -> None:
    """Raises PROVIDER_BAD_RESPONSE if a ``200`` JSON answer carries a non-empty ``error``.

    A rate limit reported this way still lowers the provider gate's in-flight limit as a 429
    would, so this worker sends fewer calls at once, not only this task's retry; an auth or quota
    refusal reported this way opens the credential's breaker as a 401 or a quota 429 would, so
    every worker stops calling with that key (this task's retry then fails with its kind).
    """
    error = body.get("error")
    if error:
        failure = classify_error_body(error, key_setting=provider.config.key_setting)
        if failure.kind is ErrorKind.RATE_LIMITED:
            provider.gate.rejected_after_release()
        elif failure.kind in OPENING_KINDS:
            provider.gate.failed(None, failure)
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
        message = str(error.get("message") or "")[:300] if isinstance(error, dict) else str(error)[:300]
        detail = f"a 200 answer carrying an error (code {code or 'none'}: {message or 'no message'})"
        raise ProviderError(errors.bad_response(detail, 200, code))


def decode_base64(text: Any, *, cap: int, what: str) -> bytes:
    """Decodes base64 media strictly, refusing it before decoding if it would exceed ``cap``.

    A ``data:...;base64,`` prefix and line breaks are tolerated (some providers wrap); any other
    non-alphabet character is an error rather than silently skipped.

    Args:
        text: The JSON value that should hold the base64 string.
        cap: Largest decoded size accepted, in bytes.
        what: The field name, for the error message.

    Raises:
        ProviderError: PROVIDER_BAD_RESPONSE if the value is not a string, too large, or invalid.
    """
    if not isinstance(text, str) or not text:
        raise ProviderError(errors.bad_response(f"{what} is not a non-empty string"))
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) // 4 * 3 > cap:
        raise ProviderError(errors.bad_response(f"{what} decodes to more than the {cap}-byte cap"))
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(errors.bad_response(f"{what} is not valid base64 ({exc})")) from None
    if not data:
        raise ProviderError(errors.bad_response(f"{what} is empty"))
    return data
