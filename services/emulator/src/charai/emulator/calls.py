"""The front half every generation call shares: count it, authenticate, enforce the
concurrency limit, hold it at a closed gate, parse the body and its directives into a :class:`Call`."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from charai.emulator.calllog import CallRecord
from charai.emulator.dialects import OPENAI, ZHIPU, bad_request
from charai.emulator.modes import ERROR_MODES, Directives, Marker, directives
from charai.emulator.state import STATE_KEY, EmulatorState
from charai.emulator.wire import openai_error, zhipu_error

MODE_HEADER = "X-Emulator-Mode"
LATENCY_HEADER = "X-Emulator-Latency"


@dataclass(frozen=True)
class Call:
    """One provider call after body parsing: its text key, the directives it carries, the
    dialect it is spoken in and its call-log record (the route fills in what it produced)."""

    body: dict[str, Any]
    text: str
    call_index: int
    directives: Directives
    mode: Marker | None
    request_id: str
    dialect: str
    record: CallRecord


CallImpl = Callable[[web.Request, EmulatorState, Call], Awaitable[web.StreamResponse]]


def _openai_auth_error(missing: bool) -> web.Response:
    if missing:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header."
        )
        return openai_error(401, message, code="invalid_api_key")
    wrong = ERROR_MODES["auth"].openai
    return openai_error(401, wrong.message, type_=wrong.type, code=wrong.code)


def auth_error(request: web.Request, state: EmulatorState, dialect: str = ZHIPU) -> web.Response | None:
    """401 unless the configured key is presented as a Bearer token (constant-time compare).

    The answer never echoes the key that was sent (the real OpenAI API shows part of it)."""
    key = state.config.api_key
    if key is None:
        return None
    header = request.headers.get("Authorization", "").strip()
    if not header:
        if dialect == OPENAI:
            return _openai_auth_error(missing=True)
        return zhipu_error(401, "1001", "Authentication parameter not received in Header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8"), key.encode("utf-8")
    ):
        if dialect == OPENAI:
            return _openai_auth_error(missing=False)
        return zhipu_error(401, "1000", "Authentication Failed")
    return None


def _busy(dialect: str) -> web.Response:
    """The answer to a call over ``max_concurrency``: a rate limit, retry after a second."""
    message = "Rate limit reached for requests (concurrency)"
    if dialect == OPENAI:
        return openai_error(
            429, message, type_="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        )
    return zhipu_error(429, "1302", message, {"Retry-After": "1"})


def base_url(request: web.Request, state: EmulatorState) -> str:
    """Where clients reach ``/files``: the configured public URL, else the request's own origin."""
    if state.config.public_url:
        return state.config.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def _read_body(request: web.Request, dialect: str) -> dict[str, Any] | web.Response:
    try:
        raw = await request.read()
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return bad_request(dialect, "request body must be a JSON object")
    if not isinstance(body, dict):
        return bad_request(dialect, "request body must be a JSON object")
    return body


def _make_call(
    request: web.Request, body: dict[str, Any], text: str, call_index: int, dialect: str, record: CallRecord
) -> Call:
    """The call's directives (markers and emulator headers) and the mode that fires for it."""
    wanted = directives(text, request.headers.get(MODE_HEADER), request.headers.get(LATENCY_HEADER))
    mode = wanted.mode if wanted.mode and wanted.mode.applies_to(call_index) else None
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        request_id = uuid.uuid4().hex
    record.mode = mode.name if mode else None
    return Call(body, text, call_index, wanted, mode, request_id, dialect, record)


async def provider_call(
    request: web.Request, route: str, text_field: str, impl: CallImpl, dialect: str = ZHIPU
) -> web.StreamResponse:
    """Shared front half of every generation call.

    Order matters and mirrors a real gateway: count the call (also per call key, so tests
    see retries even when they are rejected) and log it, authenticate, enforce the concurrency
    limit, wait while the gate is closed (in flight already), then parse and hand over to the
    route. The in-flight counter is released in ``finally`` so cancelled (client-disconnected)
    calls never leak concurrency.
    """
    state = request.app[STATE_KEY]
    state.calls[route] += 1
    body = await _read_body(request, dialect)
    text = body.get(text_field) if isinstance(body, dict) else None
    text = text if isinstance(text, str) else ""
    record = CallRecord.from_body(dialect, route, body, text)
    state.log_call(record)
    call_index = state.count_key(text) if text else 0
    if text and request.headers.get("traceparent"):
        state.traceparents[text[:80]] = request.headers["traceparent"]
    response = await _admitted(request, state, body, text, call_index, dialect, record, impl)
    record.status = response.status
    return response


async def _admitted(
    request: web.Request,
    state: EmulatorState,
    body: dict[str, Any] | web.Response,
    text: str,
    call_index: int,
    dialect: str,
    record: CallRecord,
    impl: CallImpl,
) -> web.StreamResponse:
    """Authentication, the concurrency limit and the gate, then the route's own work."""
    denied = auth_error(request, state, dialect)
    if denied is not None:
        return denied
    if not state.enter():
        return _busy(dialect)
    try:
        await state.gate.passage()
        if isinstance(body, web.Response):
            return body
        return await impl(request, state, _make_call(request, body, text, call_index, dialect, record))
    finally:
        state.leave()
