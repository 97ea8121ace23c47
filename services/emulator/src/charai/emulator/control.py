"""Routes that are not generation calls: the temporary file links, liveness, and the
``/_emulator`` control routes tests and benchmarks use to read and reset the counters and to
open and close the gate."""

from __future__ import annotations

from aiohttp import web
from charai.emulator.state import STATE_KEY
from charai.emulator.wire import json_response, zhipu_error


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


async def handle_gate(request: web.Request) -> web.StreamResponse:
    """``GET /_emulator/gate``: whether the gate is open and how many calls it holds;
    ``POST`` with ``{"open": false}`` closes it (generation calls wait), ``{"open": true}``
    opens it (the held calls go on). Both answer the gate's state."""
    state = request.app[STATE_KEY]
    if request.method == "POST":
        try:
            body = await request.json()
        except ValueError:
            body = None
        wanted = body.get("open") if isinstance(body, dict) else None
        if not isinstance(wanted, bool):
            return zhipu_error(400, "400", 'the body must be {"open": true} or {"open": false}')
        if wanted:
            state.gate.open()
        else:
            state.gate.close()
    return json_response(state.gate_snapshot())
