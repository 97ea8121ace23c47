"""The Zhipu v4 API emulator as an aiohttp application.

Why it exists: every charai worker talks to Zhipu's image and GLM-TTS HTTP API. Tests,
``make demo`` and benchmarks must not need a real key, network access or money, and they
need the provider to misbehave on demand (rate limits, 500s, hangs, malicious bodies). This
app answers the same URLs with the same shapes, status codes and string error codes as the
real service (see ``/work/shared/reference/zhipu-api.md``), plus a few control endpoints
under ``/_emulator`` that let tests count provider calls.

Routes (``API_PREFIX`` = ``/api/paas/v4``):

* ``POST {API_PREFIX}/images/generations``: synchronous image.
* ``POST {API_PREFIX}/async/images/generations`` and ``GET {API_PREFIX}/async-result/{id}``.
* ``POST {API_PREFIX}/audio/speech``: GLM-TTS (raw wav/pcm, optional SSE stream).
* ``GET /files/{name}``: the "temporary links" the API hands out (no auth, like a CDN).
* ``GET /healthz``, ``GET /_emulator/stats``, ``POST /_emulator/reset``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from charai.emulator import media
from charai.emulator.modes import (
    ASYNC_TASK_FAIL_MODES,
    DEFAULT_HANG_SECONDS,
    DEFAULT_HUGE_MIB,
    DEFAULT_JSON_ERROR_CODE,
    ERROR_MODES,
    REDIRECT_TARGET,
    Directives,
    Marker,
    directives,
    error_body,
    strip_markers,
)

log = logging.getLogger("charai.emulator")

API_PREFIX = "/api/paas/v4"
MODE_HEADER = "X-Emulator-Mode"
LATENCY_HEADER = "X-Emulator-Latency"

IMAGE_MODELS: tuple[str, ...] = ("glm-image", "cogview-4-250304", "cogview-4", "cogview-3-flash")
ASYNC_IMAGE_MODELS: tuple[str, ...] = ("glm-image",)
TTS_MODELS: tuple[str, ...] = ("glm-tts",)
TTS_MAX_INPUT_CHARS = 1024

GLM_IMAGE_RECOMMENDED = frozenset(
    {(1280, 1280), (1568, 1056), (1056, 1568), (1472, 1088), (1088, 1472), (1728, 960), (960, 1728)}
)
COGVIEW_RECOMMENDED = frozenset(
    {(1024, 1024), (768, 1344), (864, 1152), (1344, 768), (1152, 864), (1440, 720), (720, 1440)}
)

ROUTES: tuple[str, ...] = (
    "images.generations",
    "async.images.generations",
    "async-result",
    "audio.speech",
    "files",
)
"""Names used as keys of ``stats()["calls"]``."""

BAD_B64_PNG = "iVBORw0KGgo%%%"
"""Starts like a base64 PNG but is invalid base64 even for lenient decoders (11 alphabet
characters left after discarding junk, so the padding check fails)."""
BAD_B64_WAV = "UklGRiQ%%%"
"""Same trick for a WAV ("RIFF...") payload."""

WRONG_TYPE_HTML = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
)

_HUGE_PLACEHOLDER = "@@HUGE-PAYLOAD@@"
_HUGE_CHUNK = 256 * 1024
_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_VOICES_NOTE = "any non-empty string: built-in voices or a cloned-voice id"


@dataclass
class EmulatorConfig:
    """How the emulator behaves; every field has a demo-friendly default.

    Attributes:
        latency_min: Lower bound of the simulated generation time, seconds.
        latency_max: Upper bound; each call draws uniformly from [min, max].
        async_poll_steps: Async tasks answer ``PROCESSING`` to at least this many polls.
        api_key: If set, API calls must send ``Authorization: Bearer <key>`` (never logged,
            hidden from ``repr``).
        max_concurrency: In-flight generation calls above this get 429/1302, like the
            real per-account concurrency limit. ``None`` means unlimited.
        seed: Makes latencies, images and garbage bytes reproducible.
        file_cache_size: How many generated files ``/files`` keeps (LRU).
        max_tasks: How many async tasks are remembered (oldest dropped first).
        public_url: Base for returned file URLs; default is the request's own scheme and
            Host header, so clients reach the files at the address they already use.
    """

    latency_min: float = 0.2
    latency_max: float = 0.6
    async_poll_steps: int = 3
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int | None = None
    seed: int = 0
    file_cache_size: int = 256
    max_tasks: int = 10_000
    public_url: str | None = None

    def __post_init__(self) -> None:
        """Reject nonsense early, at start-up, rather than on the first request."""
        if self.latency_min < 0 or self.latency_max < self.latency_min:
            raise ValueError(f"bad latency range {self.latency_min}..{self.latency_max}")
        if self.async_poll_steps < 0:
            raise ValueError("async_poll_steps must be >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        if self.file_cache_size < 1 or self.max_tasks < 1:
            raise ValueError("file_cache_size and max_tasks must be >= 1")


@dataclass(frozen=True)
class ImageParams:
    """A validated image request."""

    model: str
    prompt: str
    width: int
    height: int
    b64: bool


@dataclass(frozen=True)
class SpeechParams:
    """A validated GLM-TTS request."""

    text: str
    response_format: str
    speed: float
    volume: float
    stream: bool
    encode_format: str


@dataclass
class AsyncTask:
    """One async image job: when it becomes ready and how it should end."""

    task_id: str
    model: str
    request_id: str
    ready_at: float
    params: ImageParams
    mode: Marker | None
    polls: int = 0
    items: list[dict[str, str]] | None = None
    finished: bool = False


@dataclass(frozen=True)
class Call:
    """One provider call after body parsing: its text key and the directives it carries."""

    body: dict[str, Any]
    text: str
    call_index: int
    directives: Directives
    mode: Marker | None
    request_id: str


class EmulatorState:
    """Counters, generated files and async tasks shared by all handlers of one app.

    Everything runs on one event loop, so plain dicts suffice (no locks).
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._latency_rng = random.Random(config.seed)
        self._garbage_rng = random.Random(config.seed + 1)
        self.files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.tasks: OrderedDict[str, AsyncTask] = OrderedDict()
        self.current = 0
        self.reset()

    def reset(self) -> None:
        """Zero all counters (including ``*N`` progress); keep files, tasks and in-flight count."""
        self.calls: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.modes: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_text: dict[str, int] = {}
        #: The W3C ``traceparent`` header of the last call per text (tests follow traces with it).
        self.traceparents: dict[str, str] = {}
        self.peak = self.current
        self.rejected = 0
        self.cancelled = 0
        self.tasks_created = 0
        self.tasks_succeeded = 0
        self.tasks_failed = 0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters (the ``/_emulator/stats`` body)."""
        return {
            "calls": dict(self.calls),
            "total_calls": sum(v for k, v in self.calls.items() if k != "files"),
            "modes": dict(self.modes),
            "statuses": dict(self.statuses),
            "concurrency": {
                "current": self.current,
                "peak": self.peak,
                "limit": self.config.max_concurrency,
                "rejected": self.rejected,
            },
            "by_key": dict(self.by_key),
            "by_text": dict(self.by_text),
            "traceparents": dict(self.traceparents),
            "tasks": {
                "created": self.tasks_created,
                "succeeded": self.tasks_succeeded,
                "failed": self.tasks_failed,
            },
            "cancelled": self.cancelled,
            "files_stored": len(self.files),
        }

    def count_key(self, text: str) -> int:
        """Count one call for ``text``'s call key; return how many calls preceded it."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        prior = self.by_key.get(digest, 0)
        self.by_key[digest] = prior + 1
        short = text[:80]
        self.by_text[short] = self.by_text.get(short, 0) + 1
        return prior

    def count_mode(self, name: str) -> None:
        """Record that a failure mode actually fired."""
        self.modes[name] = self.modes.get(name, 0) + 1

    def record_status(self, status: int) -> None:
        """Record the HTTP status of one API answer."""
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def enter(self) -> bool:
        """Start an in-flight call; ``False`` (already undone) if over ``max_concurrency``."""
        self.current += 1
        limit = self.config.max_concurrency
        if limit is not None and self.current > limit:
            self.current -= 1
            self.rejected += 1
            return False
        self.peak = max(self.peak, self.current)
        return True

    def leave(self) -> None:
        """Finish an in-flight call started with :meth:`enter`."""
        self.current -= 1

    def latency(self, override: float | None) -> float:
        """Simulated generation time: the override if given, else seeded uniform draw."""
        if override is not None:
            return override
        return self._latency_rng.uniform(self.config.latency_min, self.config.latency_max)

    def garbage(self, size: int = 4096) -> bytes:
        """Random bytes that are no known media format (first byte is never a magic start)."""
        return b"\x00" + self._garbage_rng.randbytes(size - 1)

    def store_file(self, data: bytes, ext: str, content_type: str, base_url: str) -> str:
        """Keep ``data`` for ``GET /files/{name}`` (LRU bounded) and return its URL."""
        name = f"{uuid.uuid4().hex}.{ext}"
        self.files[name] = (data, content_type)
        while len(self.files) > self.config.file_cache_size:
            self.files.popitem(last=False)
        return f"{base_url}/files/{name}"

    def add_task(self, task: AsyncTask) -> None:
        """Remember an async task, forgetting the oldest beyond ``max_tasks``."""
        self.tasks[task.task_id] = task
        self.tasks_created += 1
        while len(self.tasks) > self.config.max_tasks:
            self.tasks.popitem(last=False)


STATE_KEY = web.AppKey("charai_emulator_state", EmulatorState)


# --------------------------------------------------------------------------- responses


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Compact JSON with ``application/json``, the way Zhipu answers."""
    return web.json_response(payload, status=status, headers=headers, dumps=_dumps)


def zhipu_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in Zhipu's envelope: ``{"error": {"code": "<string>", "message": ...}}``."""
    return json_response(error_body(code, message), status=status, headers=headers)


def _mode_error(mode: Marker) -> web.Response:
    status, code, message = ERROR_MODES[mode.name]
    headers: dict[str, str] | None = None
    if mode.name == "rate":
        seconds = mode.float_arg(1.0)
        headers = {"Retry-After": str(int(seconds)) if seconds == int(seconds) else str(seconds)}
    return zhipu_error(status, code, message, headers)


def _json_error_200(mode: Marker) -> web.Response:
    code = (mode.arg or DEFAULT_JSON_ERROR_CODE).strip() or DEFAULT_JSON_ERROR_CODE
    message = next((m for _, c, m in ERROR_MODES.values() if c == code), "Request failed")
    return zhipu_error(200, code, message)


def _generic_body_mode(mode: Marker | None) -> web.Response | None:
    """Body modes that look the same on every route: redirect, wrong type, error-in-200."""
    if mode is None:
        return None
    if mode.name == "redirect":
        return web.Response(status=302, headers={"Location": REDIRECT_TARGET})
    if mode.name == "wrong-type":
        return web.Response(text=WRONG_TYPE_HTML, content_type="text/html")
    if mode.name == "json-error-200":
        return _json_error_200(mode)
    return None


def _truncated_json(payload: Any) -> web.Response:
    text = _dumps(payload).encode("utf-8")
    return web.Response(body=text[: len(text) // 2], content_type="application/json")


def _huge_bytes(mode: Marker) -> int:
    return int(mode.float_arg(DEFAULT_HUGE_MIB) * 1024 * 1024)


async def _stream_body(
    request: web.Request,
    content_type: str,
    *,
    prefix: bytes,
    filler: int,
    fill_byte: bytes,
    suffix: bytes,
) -> web.StreamResponse:
    """Stream ``prefix + fill_byte * filler + suffix`` in chunks, chunked encoding.

    Why chunked and no Content-Length: a client must cap the body while reading, not trust
    a header; and the emulator never holds the whole body in memory.
    """
    response = web.StreamResponse(status=200)
    response.content_type = content_type
    await response.prepare(request)
    chunk = fill_byte * _HUGE_CHUNK
    try:
        await response.write(prefix)
        remaining = filler
        while remaining > 0:
            step = min(remaining, _HUGE_CHUNK)
            await response.write(chunk if step == _HUGE_CHUNK else chunk[:step])
            remaining -= step
        await response.write(suffix)
        await response.write_eof()
    except ConnectionError:
        log.debug("client went away during a huge body")
    return response


async def _stream_huge_json(
    request: web.Request, payload_with_placeholder: Any, size: int
) -> web.StreamResponse:
    """Valid JSON whose one string field is ``size`` bytes of ``A``: a memory bomb."""
    text = _dumps(payload_with_placeholder)
    before, _, after = text.partition(_HUGE_PLACEHOLDER)
    return await _stream_body(
        request,
        "application/json",
        prefix=before.encode(),
        filler=size,
        fill_byte=b"A",
        suffix=after.encode(),
    )


def _base_url(request: web.Request, state: EmulatorState) -> str:
    if state.config.public_url:
        return state.config.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(message: str) -> web.Response:
    return zhipu_error(400, "1214", message)


def _valid_size(model: str, width: int, height: int) -> bool:
    """The documented custom-size rules, plus the recommended sizes that break them."""
    if model == "glm-image":
        if (width, height) in GLM_IMAGE_RECOMMENDED:
            return True
        return (
            1024 <= width <= 2048
            and 1024 <= height <= 2048
            and width % 32 == 0
            and height % 32 == 0
            and width * height <= 2**22
        )
    if (width, height) in COGVIEW_RECOMMENDED:
        return True
    return (
        512 <= width <= 2048
        and 512 <= height <= 2048
        and width % 16 == 0
        and height % 16 == 0
        and width * height <= 2**21
    )


def validate_image(body: dict[str, Any], *, async_route: bool) -> ImageParams | web.Response:
    """Check an image request like the real API; return params or the 400 answer."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _invalid("model is required")
    if model not in IMAGE_MODELS:
        return zhipu_error(400, "1211", "Unknown Model, please check the model code.")
    if async_route and model not in ASYNC_IMAGE_MODELS:
        return zhipu_error(400, "1211", f"model {model} does not support async")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _invalid("prompt is required")
    size = body.get("size")
    if size is None:
        size = "1280x1280" if model == "glm-image" else "1024x1024"
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if match is None:
        return _invalid(f"size must look like 1024x1024, got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not _valid_size(model, width, height):
        return _invalid(f"size {size} is not supported by {model}")
    quality = body.get("quality")
    if quality is not None and quality not in ("hd", "standard"):
        return _invalid("quality must be hd or standard")
    response_format = body.get("response_format")
    if response_format is not None and response_format not in ("url", "b64_json"):
        return _invalid("response_format must be url or b64_json")
    count = body.get("n")
    if count is not None and (isinstance(count, bool) or count != 1):
        return _invalid("n must be 1")
    watermark = body.get("watermark_enabled")
    if watermark is not None and not isinstance(watermark, bool):
        return _invalid("watermark_enabled must be a boolean")
    user_id = body.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not 6 <= len(user_id) <= 128):
        return _invalid("user_id must be 6-128 characters")
    return ImageParams(model, prompt, width, height, response_format == "b64_json")


def validate_speech(body: dict[str, Any]) -> SpeechParams | web.Response:
    """Check a GLM-TTS request like the real API; return params or the 400 answer."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _invalid("model is required")
    if model not in TTS_MODELS:
        return zhipu_error(400, "1211", "Unknown Model, please check the model code.")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return _invalid("input is required")
    if len(text) > TTS_MAX_INPUT_CHARS:
        return zhipu_error(400, "1261", f"input exceeds {TTS_MAX_INPUT_CHARS} characters")
    voice = body.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        return _invalid(f"voice must be {_VOICES_NOTE}")
    response_format = body.get("response_format", "pcm")
    if response_format not in ("wav", "pcm"):
        return _invalid("response_format must be wav or pcm")
    speed = body.get("speed", 1.0)
    if not _is_number(speed) or not 0.5 <= speed <= 2.0:
        return _invalid("speed must be within [0.5, 2]")
    volume = body.get("volume", 1.0)
    if not _is_number(volume) or not 0 < volume <= 10:
        return _invalid("volume must be within (0, 10]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return _invalid("stream must be a boolean")
    if stream and response_format != "pcm":
        return _invalid("streaming supports only pcm")
    encode_format = body.get("encode_format", "base64")
    if encode_format not in ("base64", "hex"):
        return _invalid("encode_format must be base64 or hex")
    watermark = body.get("watermark_enabled")
    if watermark is not None and not isinstance(watermark, bool):
        return _invalid("watermark_enabled must be a boolean")
    return SpeechParams(
        strip_markers(text), response_format, float(speed), float(volume), stream, encode_format
    )


# --------------------------------------------------------------------------- call plumbing


def _auth_error(request: web.Request, state: EmulatorState) -> web.Response | None:
    """401 unless the configured key is presented as a Bearer token (constant-time compare)."""
    key = state.config.api_key
    if key is None:
        return None
    header = request.headers.get("Authorization", "").strip()
    if not header:
        return zhipu_error(401, "1001", "Authentication parameter not received in Header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8"), key.encode("utf-8")
    ):
        return zhipu_error(401, "1000", "Authentication Failed")
    return None


async def _read_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        raw = await request.read()
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _invalid("request body must be a JSON object")
    if not isinstance(body, dict):
        return _invalid("request body must be a JSON object")
    return body


CallImpl = Callable[[web.Request, EmulatorState, Call], Awaitable[web.StreamResponse]]


async def _provider_call(
    request: web.Request, route: str, text_field: str, impl: CallImpl
) -> web.StreamResponse:
    """Shared front half of every generation call.

    Order matters and mirrors a real gateway: count the call (also per call key, so tests
    see retries even when they are rejected), authenticate, enforce the concurrency limit,
    then parse and hand over to the route. The in-flight counter is released in
    ``finally`` so cancelled (client-disconnected) calls never leak concurrency.
    """
    state = request.app[STATE_KEY]
    state.calls[route] += 1
    body = await _read_body(request)
    text = body.get(text_field) if isinstance(body, dict) else None
    text = text if isinstance(text, str) else ""
    call_index = state.count_key(text) if text else 0
    if text and request.headers.get("traceparent"):
        state.traceparents[text[:80]] = request.headers["traceparent"]
    denied = _auth_error(request, state)
    if denied is not None:
        return denied
    if not state.enter():
        return zhipu_error(429, "1302", "Rate limit reached for requests (concurrency)", {"Retry-After": "1"})
    try:
        if isinstance(body, web.Response):
            return body
        wanted = directives(text, request.headers.get(MODE_HEADER), request.headers.get(LATENCY_HEADER))
        mode = wanted.mode if wanted.mode and wanted.mode.applies_to(call_index) else None
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            request_id = uuid.uuid4().hex
        call = Call(body, text, call_index, wanted, mode, request_id)
        return await impl(request, state, call)
    finally:
        state.leave()


async def _apply_front_mode(
    state: EmulatorState, call: Call, deferred: frozenset[str] = frozenset()
) -> web.Response | None:
    """Count the active mode; answer error modes now; perform ``hang``.

    ``deferred`` error modes are left for later (the async route turns them into a FAIL
    task status instead of an HTTP error).
    """
    mode = call.mode
    if mode is None:
        return None
    state.count_mode(mode.name)
    if mode.name in ERROR_MODES and mode.name not in deferred:
        return _mode_error(mode)
    if mode.name == "hang":
        # Cancelled by aiohttp (handler_cancellation) if the client disconnects.
        await asyncio.sleep(mode.float_arg(DEFAULT_HANG_SECONDS))
    return None


def _image_seed(state: EmulatorState, prompt: str) -> int:
    digest = hashlib.sha256(f"{state.config.seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


async def _image_items(
    request: web.Request, state: EmulatorState, params: ImageParams, mode: Marker | None
) -> list[dict[str, str]]:
    """The ``data``/``image_result`` list: a URL or base64 of a real (or garbage) PNG."""
    name = mode.name if mode else None
    if name == "bad-b64":
        return [{"b64_json": BAD_B64_PNG}]
    if name == "garbage":
        data = state.garbage()
    else:
        seed = _image_seed(state, strip_markers(params.prompt))
        data = await asyncio.to_thread(media.make_png, params.width, params.height, seed)
    if params.b64:
        return [{"b64_json": base64.b64encode(data).decode("ascii")}]
    return [{"url": state.store_file(data, "png", "image/png", _base_url(request, state))}]


async def _image_answer(
    request: web.Request,
    state: EmulatorState,
    *,
    mode: Marker | None,
    items: list[dict[str, str]] | None,
    params: ImageParams,
    build: Callable[[list[dict[str, str]]], dict[str, Any]],
) -> tuple[web.StreamResponse, list[dict[str, str]] | None]:
    """Final image answer, with truncated/huge/bad-b64/garbage applied."""
    name = mode.name if mode else None
    if name == "huge":
        payload = build([{"b64_json": _HUGE_PLACEHOLDER}])
        assert mode is not None
        return await _stream_huge_json(request, payload, _huge_bytes(mode)), None
    if items is None:
        items = await _image_items(request, state, params, mode)
    payload = build(items)
    if name == "truncated":
        return _truncated_json(payload), items
    return json_response(payload), items


# --------------------------------------------------------------------------- handlers


async def _sync_image_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_image(call.body, async_route=False)
    if isinstance(params, web.Response):
        return params
    early = await _apply_front_mode(state, call)
    if early is not None:
        return early
    await asyncio.sleep(state.latency(call.directives.latency))
    generic = _generic_body_mode(call.mode)
    if generic is not None:
        return generic
    created = int(time.time())

    def build(items: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "created": created,
            "data": items,
            "content_filter": [{"role": "assistant", "level": 3}],
        }

    if call.mode is not None and call.mode.name == "bad-b64":
        params = ImageParams(params.model, params.prompt, params.width, params.height, True)
    response, _ = await _image_answer(request, state, mode=call.mode, items=None, params=params, build=build)
    return response


async def handle_image_sync(request: web.Request) -> web.StreamResponse:
    """``POST /images/generations``: validate, wait the latency, return one image."""
    return await _provider_call(request, "images.generations", "prompt", _sync_image_impl)


async def _async_submit_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_image(call.body, async_route=True)
    if isinstance(params, web.Response):
        return params
    early = await _apply_front_mode(state, call, deferred=ASYNC_TASK_FAIL_MODES)
    if early is not None:
        return early
    task = AsyncTask(
        task_id=uuid.uuid4().hex,
        model=params.model,
        request_id=call.request_id,
        ready_at=time.monotonic() + state.latency(call.directives.latency),
        params=params,
        mode=call.mode,
    )
    state.add_task(task)
    return json_response(
        {
            "model": task.model,
            "id": task.task_id,
            "request_id": task.request_id,
            "task_status": "PROCESSING",
        }
    )


async def handle_async_submit(request: web.Request) -> web.StreamResponse:
    """``POST /async/images/generations`` (glm-image only): accept and return a task id."""
    return await _provider_call(request, "async.images.generations", "prompt", _async_submit_impl)


async def handle_async_result(request: web.Request) -> web.StreamResponse:
    """``GET /async-result/{id}``: PROCESSING until ready and polled enough, then the result.

    Body-shaped failure modes (truncated, huge, redirect...) apply to the final answer,
    because that is the response a worker parses for the image.
    """
    state = request.app[STATE_KEY]
    state.calls["async-result"] += 1
    denied = _auth_error(request, state)
    if denied is not None:
        return denied
    task = state.tasks.get(request.match_info["task_id"])
    if task is None:
        return zhipu_error(404, "404", "Task not found")
    task.polls += 1
    base = {"model": task.model, "request_id": task.request_id}
    if task.polls <= state.config.async_poll_steps or time.monotonic() < task.ready_at:
        return json_response({**base, "task_status": "PROCESSING"})
    mode = task.mode
    if mode is not None and mode.name in ASYNC_TASK_FAIL_MODES:
        if not task.finished:
            task.finished = True
            state.tasks_failed += 1
        _, code, message = ERROR_MODES[mode.name]
        return json_response({**base, "task_status": "FAIL", **error_body(code, message)})
    generic = _generic_body_mode(mode)
    if generic is not None:
        return generic

    def build(items: list[dict[str, str]]) -> dict[str, Any]:
        return {**base, "task_status": "SUCCESS", "image_result": items}

    response, items = await _image_answer(
        request, state, mode=mode, items=task.items, params=task.params, build=build
    )
    if items is not None:
        task.items = items
    if not task.finished:
        task.finished = True
        state.tasks_succeeded += 1
    return response


async def _speech_stream(request: web.Request, call: Call, params: SpeechParams) -> web.StreamResponse:
    """SSE answer in the SDK's ``choices[].delta.content`` shape, ending with ``[DONE]``.

    The ``truncated`` mode stops mid-event without ``[DONE]``.
    """
    pcm = await asyncio.to_thread(media.make_pcm, params.text, params.speed, 24000, params.volume)
    response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    created = int(time.time())
    step = 2 * 4800  # 0.2 s of 24 kHz s16le per event
    pieces = [pcm[i : i + step] for i in range(0, len(pcm), step)] or [b""]
    truncated = call.mode is not None and call.mode.name == "truncated"
    try:
        for index, piece in enumerate(pieces):
            content = (
                piece.hex() if params.encode_format == "hex" else base64.b64encode(piece).decode("ascii")
            )
            last = index == len(pieces) - 1
            event = {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": content,
                            "return_sample_rate": media.DEFAULT_SAMPLE_RATE,
                        },
                        "finish_reason": "stop" if last else None,
                    }
                ],
                "created": created,
                "request_id": call.request_id,
            }
            line = f"data: {_dumps(event)}\n\n".encode()
            if truncated and index >= len(pieces) // 2:
                await response.write(line[: len(line) // 2])
                return response
            await response.write(line)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        log.debug("client went away during a TTS stream")
    return response


async def _speech_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_speech(call.body)
    if isinstance(params, web.Response):
        return params
    early = await _apply_front_mode(state, call)
    if early is not None:
        return early
    await asyncio.sleep(state.latency(call.directives.latency))
    generic = _generic_body_mode(call.mode)
    if generic is not None:
        return generic
    if params.stream:
        return await _speech_stream(request, call, params)
    name = call.mode.name if call.mode else None
    content_type = "audio/wav" if params.response_format == "wav" else "audio/pcm"
    if name == "huge":
        assert call.mode is not None
        size = _huge_bytes(call.mode)
        header = media.wav_header(media.DEFAULT_SAMPLE_RATE, size) if content_type == "audio/wav" else b""
        return await _stream_body(
            request, content_type, prefix=header, filler=size, fill_byte=b"\x00", suffix=b""
        )
    if name == "garbage":
        return web.Response(body=state.garbage(), content_type=content_type)
    if name == "bad-b64":
        return json_response({"audio_content": BAD_B64_WAV})
    payload: dict[str, str] | None = None
    if call.directives.json_audio_url or call.directives.json_audio:
        wav = await asyncio.to_thread(
            media.make_wav, params.text, params.speed, media.DEFAULT_SAMPLE_RATE, params.volume
        )
        if call.directives.json_audio_url:
            url = state.store_file(wav, "wav", "audio/wav", _base_url(request, state))
            payload = {"audio_url": url}
        else:
            payload = {"audio_content": base64.b64encode(wav).decode("ascii")}
    if payload is not None:
        return _truncated_json(payload) if name == "truncated" else json_response(payload)
    maker = media.make_wav if params.response_format == "wav" else media.make_pcm
    audio = await asyncio.to_thread(
        maker, params.text, params.speed, media.DEFAULT_SAMPLE_RATE, params.volume
    )
    if name == "truncated":
        audio = audio[: len(audio) // 2 + 1]  # odd length: not whole s16 samples either
    return web.Response(body=audio, content_type=content_type)


async def handle_speech(request: web.Request) -> web.StreamResponse:
    """``POST /audio/speech``: raw wav/pcm bytes (or JSON/SSE variants on request)."""
    return await _provider_call(request, "audio.speech", "input", _speech_impl)


async def handle_file(request: web.Request) -> web.StreamResponse:
    """``GET /files/{name}``: a previously generated image or audio file."""
    state = request.app[STATE_KEY]
    state.calls["files"] += 1
    name = request.match_info["name"]
    entry = state.files.get(name)
    if entry is None:
        return zhipu_error(404, "404", "File not found or expired")
    state.files.move_to_end(name)
    data, content_type = entry
    return web.Response(body=data, content_type=content_type)


async def handle_health(_request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: liveness for supervisors."""
    return web.Response(text="ok")


async def handle_stats(request: web.Request) -> web.StreamResponse:
    """``GET /_emulator/stats``: counters for tests and benchmarks."""
    return json_response(request.app[STATE_KEY].snapshot())


async def handle_reset(request: web.Request) -> web.StreamResponse:
    """``POST /_emulator/reset``: zero the counters (and ``*N`` progress)."""
    state = request.app[STATE_KEY]
    state.reset()
    return json_response(state.snapshot())


@web.middleware
async def _api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Keep API answers in Zhipu's error envelope and count statuses and cancellations.

    Why: a client must never see aiohttp's plain-text 404/405/413 or a traceback page on
    the API paths; the real service always answers JSON.
    """
    state = request.app[STATE_KEY]
    is_api = request.path.startswith(API_PREFIX)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        state.cancelled += 1
        raise
    except web.HTTPException as exc:
        if not is_api or exc.status < 400:
            raise
        response = zhipu_error(exc.status, str(exc.status), exc.reason)
    except Exception:
        if not is_api:
            raise
        log.exception("emulator handler failed on %s", request.path)
        response = zhipu_error(500, "500", "Internal Error")
    if is_api:
        state.record_status(response.status)
    return response


def build_app(config: EmulatorConfig | None = None) -> web.Application:
    """Create the emulator application (state lives in ``app[STATE_KEY]``).

    Run it with ``web.AppRunner(app, handler_cancellation=True)`` so a client that gives up
    on a ``hang`` call cancels the sleeping handler instead of leaking it.
    """
    app = web.Application(middlewares=[_api_middleware], client_max_size=4 * 1024 * 1024)
    app[STATE_KEY] = EmulatorState(config or EmulatorConfig())
    app.router.add_post(f"{API_PREFIX}/images/generations", handle_image_sync)
    app.router.add_post(f"{API_PREFIX}/async/images/generations", handle_async_submit)
    app.router.add_get(f"{API_PREFIX}/async-result/{{task_id}}", handle_async_result)
    app.router.add_post(f"{API_PREFIX}/audio/speech", handle_speech)
    app.router.add_get("/files/{name}", handle_file)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/_emulator/stats", handle_stats)
    app.router.add_post("/_emulator/reset", handle_reset)
    return app
