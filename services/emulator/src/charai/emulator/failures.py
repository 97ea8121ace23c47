"""Failure modes on the wire: the HTTP errors, hangs and malformed bodies a ``[[mode]]`` marker
(or the ``X-Emulator-Mode`` header) asks for, and the generation step every route shares."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from charai.emulator.calls import Call
from charai.emulator.dialects import OPENAI, ZHIPU
from charai.emulator.modes import (
    DEFAULT_HANG_SECONDS,
    DEFAULT_HUGE_MIB,
    DEFAULT_JSON_ERROR_CODE,
    ERROR_MODES,
    REDIRECT_TARGET,
    Marker,
    mode_for_code,
)
from charai.emulator.state import EmulatorState
from charai.emulator.wire import dumps, openai_error, stream_body, zhipu_error

BAD_B64_PNG = "iVBORw0KGgo%%%"
"""Starts like a base64 PNG but is invalid base64 even for lenient decoders (11 alphabet
characters left after discarding junk, so the padding check fails)."""
BAD_B64_WAV = "UklGRiQ%%%"
"""Same trick for a WAV ("RIFF...") payload."""

WRONG_TYPE_HTML = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
)

HUGE_PLACEHOLDER = "@@HUGE-PAYLOAD@@"
"""Stands for the huge string field in a payload given to :func:`stream_huge_json`."""


def _mode_error(mode: Marker, dialect: str) -> web.Response:
    """The error answer of an error mode, from the one table, in the call's dialect."""
    row = ERROR_MODES[mode.name]
    headers: dict[str, str] | None = None
    if mode.name == "rate":
        seconds = mode.float_arg(1.0)
        headers = {"Retry-After": str(int(seconds)) if seconds == int(seconds) else str(seconds)}
    if dialect == OPENAI:
        oai = row.openai
        return openai_error(oai.status, oai.message, type_=oai.type, code=oai.code, headers=headers)
    return zhipu_error(row.status, row.code, row.message, headers)


def _json_error_200(mode: Marker, dialect: str) -> web.Response:
    code = (mode.arg or DEFAULT_JSON_ERROR_CODE).strip() or DEFAULT_JSON_ERROR_CODE
    row = mode_for_code(code)
    if dialect == OPENAI and row is not None:
        return openai_error(200, row.openai.message, type_=row.openai.type, code=row.openai.code)
    if dialect == OPENAI:
        return openai_error(200, "Request failed", code=code)
    return zhipu_error(200, code, row.message if row else "Request failed")


def delivers_normally(mode: Marker | None) -> bool:
    """Whether a call with this mode ends in a normal, complete answer (the call log counts what
    such answers deliver): no mode, or one that only delays (``hang:s``) or changes nothing."""
    return mode is None or mode.name in ("hang", "crash")


def generic_body_mode(mode: Marker | None, dialect: str = ZHIPU) -> web.Response | None:
    """Body modes that look the same on every route: redirect, wrong type, error-in-200."""
    if mode is None:
        return None
    if mode.name == "redirect":
        return web.Response(status=302, headers={"Location": REDIRECT_TARGET})
    if mode.name == "wrong-type":
        return web.Response(text=WRONG_TYPE_HTML, content_type="text/html")
    if mode.name == "json-error-200":
        return _json_error_200(mode, dialect)
    return None


def truncated_json(payload: Any) -> web.Response:
    """The first half of the payload's JSON text: a body cut off mid-way."""
    text = dumps(payload).encode("utf-8")
    return web.Response(body=text[: len(text) // 2], content_type="application/json")


def huge_bytes(mode: Marker) -> int:
    """Size in bytes a ``huge`` mode asks for (its argument in MiB)."""
    return int(mode.float_arg(DEFAULT_HUGE_MIB) * 1024 * 1024)


async def stream_huge_json(
    request: web.Request, payload_with_placeholder: Any, size: int
) -> web.StreamResponse:
    """Valid JSON whose one string field is ``size`` bytes of ``A``: a memory bomb."""
    text = dumps(payload_with_placeholder)
    before, _, after = text.partition(HUGE_PLACEHOLDER)
    return await stream_body(
        request,
        "application/json",
        prefix=before.encode(),
        filler=size,
        fill_byte=b"A",
        suffix=after.encode(),
    )


async def apply_front_mode(
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
        return _mode_error(mode, call.dialect)
    if mode.name == "hang":
        # Cancelled by aiohttp (handler_cancellation) if the client disconnects.
        await asyncio.sleep(mode.float_arg(DEFAULT_HANG_SECONDS))
    return None


async def simulate_generation(state: EmulatorState, call: Call) -> web.Response | None:
    """What every synchronous generation route does once the request is valid.

    Error modes answer at once and ``hang`` hangs (:func:`apply_front_mode`); then the
    simulated generation time passes, and body modes that look the same on every route answer.
    ``None``: the route writes its own answer.
    """
    early = await apply_front_mode(state, call)
    if early is not None:
        return early
    await asyncio.sleep(state.latency(call.directives.latency))
    return generic_body_mode(call.mode, call.dialect)
