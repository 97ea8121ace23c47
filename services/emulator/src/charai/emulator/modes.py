"""Failure-mode markers and the error table (Zhipu and OpenAI answers) the emulator answers with.

Why markers in the prompt: the text is the one thing that travels unchanged from a test,
through the gateway, the queue and the worker, to the provider. Putting ``[[server*2]]`` in
a prompt lets an end-to-end test script exactly how the "provider" misbehaves for that one
task without any side channel. The header ``X-Emulator-Mode`` does the same for tests that
talk to the emulator directly, and wins over the text.

Grammar: ``[[name]]``, ``[[name:arg]]``, ``[[name*N]]`` or ``[[name*N:arg]]``; in the header the
same without the brackets. ``*N`` limits the mode to the first N calls that share a call key
(the SHA-256 of the prompt/input text), so retries of one task see the failure N times and
then succeed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple


class OpenAIError(NamedTuple):
    """How an error mode looks in the OpenAI dialect: ``{"error": {message, type, param, code}}``."""

    status: int
    type: str
    code: str | None
    message: str


class ErrorMode(NamedTuple):
    """One error mode in both dialects.

    Why one row per mode for both: a test that scripts ``[[quota]]`` means "the account is out of
    money" whatever dialect the worker speaks, so both answers are derived from the same row.
    """

    status: int
    code: str
    message: str
    openai: OpenAIError


_OPENAI_SERVER = OpenAIError(
    500, "server_error", None, "The server had an error while processing your request. Sorry about that!"
)

ERROR_MODES: dict[str, ErrorMode] = {
    "auth": ErrorMode(
        401,
        "1000",
        "Authentication Failed",
        OpenAIError(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        ),
    ),
    "forbidden": ErrorMode(
        403,
        "1220",
        "You do not have permission to access this API",
        OpenAIError(
            403,
            "invalid_request_error",
            "unsupported_country_region_territory",
            "Country, region, or territory not supported",
        ),
    ),
    "content": ErrorMode(
        400,
        "1301",
        "System detected potentially unsafe or sensitive content in input or generation. "
        "Please avoid using prompts that may generate sensitive content.",
        OpenAIError(
            400,
            "invalid_request_error",
            "content_policy_violation",
            "Your request was rejected as a result of our safety system. Your prompt may contain text "
            "that is not allowed by our safety system.",
        ),
    ),
    "invalid": ErrorMode(
        400, "1214", "Invalid parameter", OpenAIError(400, "invalid_request_error", None, "Invalid parameter")
    ),
    "model": ErrorMode(
        400,
        "1211",
        "Unknown Model, please check the model code.",
        OpenAIError(
            404,
            "invalid_request_error",
            "model_not_found",
            "The model does not exist or you do not have access to it.",
        ),
    ),
    "too-long": ErrorMode(
        400,
        "1261",
        "Prompt exceeds max length",
        OpenAIError(400, "invalid_request_error", "string_above_max_length", "Prompt exceeds max length"),
    ),
    "quota": ErrorMode(
        429,
        "1113",
        "Insufficient balance or no resource package. Please recharge.",
        OpenAIError(
            429,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
    ),
    "rate": ErrorMode(
        429,
        "1302",
        "Rate limit reached for requests",
        OpenAIError(429, "requests", "rate_limit_exceeded", "Rate limit reached for requests"),
    ),
    "overload": ErrorMode(
        429,
        "1305",
        "The service may be temporarily overloaded, please try again later",
        OpenAIError(503, "server_error", None, "The engine is currently overloaded, please try again later"),
    ),
    "server": ErrorMode(500, "500", "Internal Error", _OPENAI_SERVER),
    "zhipu-500": ErrorMode(500, "1234", "Network error, please contact customer service", _OPENAI_SERVER),
}
"""Mode name -> its Zhipu answer (HTTP status, string code, message, per the [ERR]/[ERRZ] table) and
its OpenAI answer (status, ``type``, ``code``, message)."""

BODY_MODES: frozenset[str] = frozenset(
    {
        "hang",
        "truncated",
        "bad-b64",
        "wrong-type",
        "json-error-200",
        "huge",
        "garbage",
        "redirect",
        "crash",
    }
)
"""Modes that answer 200-ish (or 302) but with a body a careful client must reject."""

FAILURE_MODES: frozenset[str] = frozenset(ERROR_MODES) | BODY_MODES

ASYNC_TASK_FAIL_MODES: frozenset[str] = frozenset({"content", "server", "zhipu-500"})
"""On the async image route these are accepted at submit and end the task as ``FAIL``:
content moderation and generation crashes happen after the job was queued."""

REDIRECT_TARGET = "http://127.0.0.1:1/"
"""Where ``redirect`` points: a closed port on loopback. A client that follows it is doing
server-side request forgery on the provider's say-so."""

DEFAULT_HANG_SECONDS = 3600.0
DEFAULT_HUGE_MIB = 64.0
DEFAULT_JSON_ERROR_CODE = "1301"
"""``json-error-200`` without an argument: the content-filter error (Zhipu 1301, OpenAI
``content_policy_violation``); the argument may name either dialect's code."""

_MARKER = re.compile(r"\[\[([a-z0-9][a-z0-9-]*)(?:\*(\d+))?(?::([^\]]*))?\]\]")
_SPEC = re.compile(r"^\s*([a-z0-9][a-z0-9-]*)(?:\*(\d+))?(?::(.*?))?\s*$")


@dataclass(frozen=True)
class Marker:
    """One parsed ``[[name*limit:arg]]`` marker.

    Attributes:
        name: Mode or directive name, e.g. ``server`` or ``latency``.
        limit: ``N`` from ``*N``: the mode applies to the first N calls of a call key only.
        arg: Text after ``:``, meaning depends on the mode (seconds, MiB, code).
    """

    name: str
    limit: int | None = None
    arg: str | None = None

    def applies_to(self, call_index: int) -> bool:
        """Whether the mode fires for the call with this 0-based index within its key."""
        return self.limit is None or call_index < self.limit

    def float_arg(self, default: float) -> float:
        """The argument as a non-negative float, or ``default`` if absent or unparsable."""
        if self.arg is None or not self.arg.strip():
            return default
        try:
            value = float(self.arg)
        except ValueError:
            return default
        return value if math.isfinite(value) and value >= 0 else default


def _marker(match: re.Match[str]) -> Marker:
    limit = int(match.group(2)) if match.group(2) is not None else None
    return Marker(match.group(1), limit, match.group(3))


def parse_markers(text: str) -> list[Marker]:
    """All ``[[...]]`` markers in ``text``, in order; unknown names are kept (and ignored later)."""
    return [_marker(m) for m in _MARKER.finditer(text)]


def parse_spec(spec: str) -> Marker | None:
    """Parse a header value such as ``rate*1:2``; ``None`` if it is not well formed."""
    match = _SPEC.match(spec.lower() if spec else "")
    return _marker(match) if match else None


def strip_markers(text: str) -> str:
    """The text with every marker removed: what the "model" should actually render."""
    return _MARKER.sub("", text)


@dataclass(frozen=True)
class Directives:
    """Everything the markers and emulator headers ask of one request.

    Attributes:
        mode: The failure mode requested (header first, then the first known marker).
        latency: Latency override in seconds, if any.
        json_audio: TTS should answer ``{"audio_content": base64}``.
        json_audio_url: TTS should answer ``{"audio_url": ...}``.
    """

    mode: Marker | None = None
    latency: float | None = None
    json_audio: bool = False
    json_audio_url: bool = False


def directives(text: str, header_mode: str | None, header_latency: str | None) -> Directives:
    """Combine text markers with the ``X-Emulator-Mode`` / ``X-Emulator-Latency`` headers.

    Headers win over markers because a direct test should be able to override whatever a
    prompt says. Unknown mode names are ignored rather than rejected, so a prompt that
    merely contains ``[[something]]`` is not broken by the emulator.
    """
    markers = parse_markers(text)
    mode: Marker | None = None
    if header_mode:
        parsed = parse_spec(header_mode)
        if parsed is not None and parsed.name in FAILURE_MODES:
            mode = parsed
    if mode is None:
        mode = next((m for m in markers if m.name in FAILURE_MODES), None)
    latency: float | None = None
    if header_latency is not None:
        latency = Marker("latency", None, header_latency).float_arg(-1.0)
    if latency is None or latency < 0:
        latency = next(
            (m.float_arg(-1.0) for m in markers if m.name == "latency" and m.float_arg(-1.0) >= 0),
            None,
        )
    names = {m.name for m in markers}
    return Directives(
        mode=mode,
        latency=latency,
        json_audio="json-audio" in names,
        json_audio_url="json-audio-url" in names,
    )


def error_body(code: str, message: str) -> dict[str, Any]:
    """The Zhipu error envelope: ``{"error": {"code": "<string>", "message": ...}}``."""
    return {"error": {"code": str(code), "message": message}}


def openai_error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}`` (nulls kept)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def mode_for_code(code: str) -> ErrorMode | None:
    """The error mode whose Zhipu or OpenAI code is ``code`` (``json-error-200:<code>``)."""
    return next((m for m in ERROR_MODES.values() if code in (m.code, m.openai.code)), None)
