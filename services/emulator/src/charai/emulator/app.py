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
* ``GET|POST /_emulator/gate``: while the gate is closed (``{"open": false}``) every
  generation call waits after it was received, until it opens (:mod:`charai.emulator.gate`).

This module only wires them: the image routes live in :mod:`charai.emulator.images`, the
TTS route in :mod:`charai.emulator.speech`, their shared front half in
:mod:`charai.emulator.calls`, failure modes in :mod:`charai.emulator.failures`, the rest in
:mod:`charai.emulator.control`, the counters in :mod:`charai.emulator.state`, and the gate in
:mod:`charai.emulator.gate`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from charai.emulator import control
from charai.emulator.config import EmulatorConfig
from charai.emulator.images import handle_async_result, handle_async_submit, handle_image_sync
from charai.emulator.speech import handle_speech
from charai.emulator.state import STATE_KEY, EmulatorState
from charai.emulator.wire import zhipu_error

log = logging.getLogger("charai.emulator")

API_PREFIX = "/api/paas/v4"


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
    app.router.add_get("/files/{name}", control.handle_file)
    app.router.add_get("/healthz", control.handle_health)
    app.router.add_get("/_emulator/stats", control.handle_stats)
    app.router.add_post("/_emulator/reset", control.handle_reset)
    app.router.add_get("/_emulator/gate", control.handle_gate)
    app.router.add_post("/_emulator/gate", control.handle_gate)
    return app
