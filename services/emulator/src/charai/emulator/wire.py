"""How the emulator puts answers on the wire: compact JSON, Zhipu's and OpenAI's error envelopes,
and streamed bodies too large to hold in memory."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from charai.emulator.modes import error_body, openai_error_body

log = logging.getLogger("charai.emulator")

_HUGE_CHUNK = 256 * 1024


def dumps(payload: Any) -> str:
    """Compact JSON text, non-ASCII kept as is (the way Zhipu writes it)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Compact JSON with ``application/json``, the way Zhipu answers."""
    return web.json_response(payload, status=status, headers=headers, dumps=dumps)


def zhipu_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in Zhipu's envelope: ``{"error": {"code": "<string>", "message": ...}}``."""
    return json_response(error_body(code, message), status=status, headers=headers)


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return json_response(openai_error_body(message, type_, code, param), status=status, headers=headers)


def invalid(message: str) -> web.Response:
    """Zhipu's 400/1214 "invalid parameter" answer."""
    return zhipu_error(400, "1214", message)


async def stream_body(
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
