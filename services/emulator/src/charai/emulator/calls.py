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
from charai.emulator.modes import Directives, Marker, directives
from charai.emulator.state import STATE_KEY, EmulatorState
from charai.emulator.wire import invalid, zhipu_error

MODE_HEADER = "X-Emulator-Mode"
LATENCY_HEADER = "X-Emulator-Latency"


@dataclass(frozen=True)
class Call:
    """One provider call after body parsing: its text key and the directives it carries."""

    body: dict[str, Any]
    text: str
    call_index: int
    directives: Directives
    mode: Marker | None
    request_id: str


CallImpl = Callable[[web.Request, EmulatorState, Call], Awaitable[web.StreamResponse]]


def auth_error(request: web.Request, state: EmulatorState) -> web.Response | None:
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


def base_url(request: web.Request, state: EmulatorState) -> str:
    """Where clients reach ``/files``: the configured public URL, else the request's own origin."""
    if state.config.public_url:
        return state.config.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def _read_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        raw = await request.read()
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return invalid("request body must be a JSON object")
    if not isinstance(body, dict):
        return invalid("request body must be a JSON object")
    return body


def _make_call(request: web.Request, body: dict[str, Any], text: str, call_index: int) -> Call:
    """The call's directives (markers and emulator headers) and the mode that fires for it."""
    wanted = directives(text, request.headers.get(MODE_HEADER), request.headers.get(LATENCY_HEADER))
    mode = wanted.mode if wanted.mode and wanted.mode.applies_to(call_index) else None
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        request_id = uuid.uuid4().hex
    return Call(body, text, call_index, wanted, mode, request_id)


async def provider_call(
    request: web.Request, route: str, text_field: str, impl: CallImpl
) -> web.StreamResponse:
    """Shared front half of every generation call.

    Order matters and mirrors a real gateway: count the call (also per call key, so tests
    see retries even when they are rejected), authenticate, enforce the concurrency limit,
    wait while the gate is closed (in flight already), then parse and hand over to the route.
    The in-flight counter is released in ``finally`` so cancelled (client-disconnected) calls
    never leak concurrency.
    """
    state = request.app[STATE_KEY]
    state.calls[route] += 1
    body = await _read_body(request)
    text = body.get(text_field) if isinstance(body, dict) else None
    text = text if isinstance(text, str) else ""
    call_index = state.count_key(text) if text else 0
    if text and request.headers.get("traceparent"):
        state.traceparents[text[:80]] = request.headers["traceparent"]
    denied = auth_error(request, state)
    if denied is not None:
        return denied
    if not state.enter():
        return zhipu_error(429, "1302", "Rate limit reached for requests (concurrency)", {"Retry-After": "1"})
    try:
        await state.gate.passage()
        if isinstance(body, web.Response):
            return body
        return await impl(request, state, _make_call(request, body, text, call_index))
    finally:
        state.leave()
