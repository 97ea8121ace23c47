"""The provider emulator (Zhipu v4 and OpenAI dialects) as an aiohttp application.

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
* OpenAI dialect (``--dialect openai``), under ``/v1``: ``POST /v1/images/generations`` and
  ``POST /v1/audio/speech`` (:mod:`charai.emulator.openai_images`, :mod:`charai.emulator.openai_speech`).
  The routes of a dialect that is not enabled answer 404.
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
from charai.emulator.dialects import OPENAI, PREFIXES, ZHIPU, dialect_of_path, http_error, server_error
from charai.emulator.images import handle_async_result, handle_async_submit, handle_image_sync
from charai.emulator.openai_images import handle_openai_image
from charai.emulator.openai_speech import handle_openai_speech
from charai.emulator.speech import handle_speech
from charai.emulator.state import STATE_KEY, EmulatorState

log = logging.getLogger("charai.emulator")

API_PREFIX = PREFIXES[ZHIPU]
OPENAI_PREFIX = PREFIXES[OPENAI]


@web.middleware
async def _api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Keep API answers in their dialect's error envelope and count statuses and cancellations.

    Why: a client must never see aiohttp's plain-text 404/405/413 or a traceback page on
    the API paths; the real services always answer JSON.
    """
    state = request.app[STATE_KEY]
    dialect = dialect_of_path(request.path)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        state.cancelled += 1
        raise
    except web.HTTPException as exc:
        if dialect is None or exc.status < 400:
            raise
        response = http_error(dialect, request, exc.status, exc.reason)
    except Exception:
        if dialect is None:
            raise
        log.exception("emulator handler failed on %s", request.path)
        response = server_error(dialect)
    if dialect is not None:
        state.record_status(response.status)
    return response


def build_app(config: EmulatorConfig | None = None) -> web.Application:
    """Create the emulator application (state lives in ``app[STATE_KEY]``).

    Run it with ``web.AppRunner(app, handler_cancellation=True)`` so a client that gives up
    on a ``hang`` call cancels the sleeping handler instead of leaking it.
    """
    config = config or EmulatorConfig()
    app = web.Application(middlewares=[_api_middleware], client_max_size=4 * 1024 * 1024)
    app[STATE_KEY] = EmulatorState(config)
    if ZHIPU in config.dialects:
        app.router.add_post(f"{API_PREFIX}/images/generations", handle_image_sync)
        app.router.add_post(f"{API_PREFIX}/async/images/generations", handle_async_submit)
        app.router.add_get(f"{API_PREFIX}/async-result/{{task_id}}", handle_async_result)
        app.router.add_post(f"{API_PREFIX}/audio/speech", handle_speech)
    if OPENAI in config.dialects:
        app.router.add_post(f"{OPENAI_PREFIX}/images/generations", handle_openai_image)
        app.router.add_post(f"{OPENAI_PREFIX}/audio/speech", handle_openai_speech)
    app.router.add_get("/files/{name}", control.handle_file)
    app.router.add_get("/healthz", control.handle_health)
    app.router.add_get("/_emulator/stats", control.handle_stats)
    app.router.add_post("/_emulator/reset", control.handle_reset)
    app.router.add_get("/_emulator/gate", control.handle_gate)
    app.router.add_post("/_emulator/gate", control.handle_gate)
    return app
