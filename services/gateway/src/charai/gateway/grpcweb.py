"""gRPC-web on the gateway's HTTP/1.1 port, bridged to the gateway's own gRPC port.

Why a loopback bridge rather than a second servicer: every gRPC-web call becomes a real gRPC call
to this process's grpc.aio server, so authentication, validation, error translation, deadlines and
the canonical log line are literally the same code for both transports (one behaviour, two
transports). Messages pass through as raw bytes: the bridge never parses protobuf, so any method
the gRPC port serves (TaskService, health, even reflection) works here too.

Wire protocol (grpc/grpc ``doc/PROTOCOL-WEB.md``): frames of ``flag(1) length(4, big-endian)
payload``; flag ``0x80`` marks the trailer frame, an HTTP/1 header block. Text mode
(``application/grpc-web-text``) is base64 of the same bytes, where each frame may carry its own
padding, so a request is decoded segment by segment and each response frame is encoded alone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import structlog
from aiohttp import hdrs, web
from charai.core import grpcsupport

log = structlog.get_logger("grpcweb")

FLAG_DATA = 0x00
FLAG_COMPRESSED = 0x01
FLAG_TRAILER = 0x80
_HEADER = struct.Struct(">BI")
#: A request body larger than this is refused before it reaches gRPC. Up to it, a message gets
#: what native gRPC would answer (its interceptor takes ``grpcsupport.MAX_MESSAGE_BYTES``, 4 MiB,
#: and names the limit past it up to what gRPC reads, 5 MiB): that much in text mode, which spends
#: 4 bytes per 3, and the frames' headers.
MAX_REQUEST_BYTES = grpcsupport.GRPC_RECEIVE_BYTES * 4 // 3 + 64 * 1024
#: The largest response message the gRPC port sends (``grpcsupport.SERVER_OPTIONS``).
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: The bridge's call on the gateway's own gRPC port (see ``GrpcWebBridge._call``).
_Call = grpc.aio.UnaryStreamCall[Any, Any] | grpc.aio.StreamStreamCall[Any, Any]
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_METADATA_KEY = re.compile(r"^[0-9a-z_.\-]+$")
#: Request headers that describe the HTTP/1.1 exchange or the browser, not the call.
_NOT_METADATA = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "dnt",
        "host",
        "keep-alive",
        "origin",
        "pragma",
        "priority",
        "referer",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "via",
        "x-grpc-web",
        "x-user-agent",
        "x-forwarded-for",
    }
)
BINARY_TYPES = frozenset({"application/grpc-web", "application/grpc-web+proto"})
TEXT_TYPES = frozenset({"application/grpc-web-text", "application/grpc-web-text+proto"})


class ProtocolError(Exception):
    """A request the bridge cannot turn into a gRPC call; answered as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- framing ----------------------------------------------------------------------------------


def frame(payload: bytes, flags: int = FLAG_DATA) -> bytes:
    return _HEADER.pack(flags, len(payload)) + payload


def parse_frames(body: bytes) -> list[tuple[int, bytes]]:
    """Splits a binary gRPC-web body into ``(flags, payload)`` frames."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < _HEADER.size:
            raise ProtocolError(grpc.StatusCode.INTERNAL, "grpc-web: truncated frame header")
        flags, length = _HEADER.unpack_from(body, pos)
        pos += _HEADER.size
        if len(body) - pos < length:
            raise ProtocolError(grpc.StatusCode.INTERNAL, "grpc-web: truncated frame")
        frames.append((flags, body[pos : pos + length]))
        pos += length
    return frames


def decode_text(body: bytes) -> bytes:
    """Base64 of a text-mode body, decoded segment by segment.

    Why not one ``b64decode``: a client may pad each frame on its own, and Python's decoder stops
    at the first padding and silently drops whatever follows (``b"AAAAAAJYWQ==gAAAAAA="``).
    """
    data = b"".join(body.split())
    out = bytearray()
    pos = 0
    while pos < len(data):
        end = data.find(b"=", pos)
        if end == -1:
            end = len(data)
        while end < len(data) and data[end] == ord("="):
            end += 1
        try:
            out += base64.b64decode(data[pos:end], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(grpc.StatusCode.INTERNAL, "grpc-web-text: malformed base64 body") from None
        pos = end
    return bytes(out)


def encode_text(data: bytes) -> bytes:
    """One response frame in text mode: encoded alone, padding included (as Envoy does)."""
    return base64.b64encode(data)


def percent_encode(message: str) -> str:
    """``grpc-message`` encoding: UTF-8, with only ``%x20-24 / %x26-7E`` left as they are."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
        for b in message.encode("utf-8", "surrogatepass")
    )


def parse_timeout(value: str | None) -> float | None:
    """``grpc-timeout`` (``<=8 digits><unit>``) in seconds; None when absent or malformed (gRPC core
    ignores a malformed value too)."""
    if not value:
        return None
    match = _TIMEOUT.match(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def _b64decode_lenient(value: str) -> bytes:
    """``-bin`` header values: standard base64, padded or not."""
    text = value.strip()
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def request_metadata(request: web.Request) -> list[tuple[str, str | bytes]]:
    """The call's metadata: every request header that is not about HTTP/1.1 or the browser.

    ``-bin`` values are base64 on the wire and bytes in gRPC; values gRPC cannot carry are dropped.
    """
    metadata: list[tuple[str, str | bytes]] = []
    for raw_key, value in request.headers.items():
        key = raw_key.lower()
        if key in _NOT_METADATA or key.startswith(("grpc-", "sec-", "access-control-", ":")):
            continue
        if not _METADATA_KEY.match(key):
            continue
        if key.endswith("-bin"):
            for part in value.split(","):
                try:
                    metadata.append((key, _b64decode_lenient(part)))
                except (binascii.Error, ValueError):
                    raise ProtocolError(
                        grpc.StatusCode.INTERNAL, f"grpc-web: header {key} is not base64"
                    ) from None
        elif all(0x20 <= ord(c) <= 0x7E for c in value):
            metadata.append((key, value))
    if request.remote:
        metadata.append(("x-forwarded-for", request.remote))
    return metadata


def _header_block(pairs: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    """gRPC metadata as HTTP header pairs (``-bin`` values base64, padded)."""
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in {"grpc-status", "grpc-message"}:
            continue
        if isinstance(value, bytes):
            out.append((key, base64.b64encode(value).decode("ascii")))
        else:
            out.append((key, value))
    return out


def trailer_pairs(
    code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]]
) -> list[tuple[str, str]]:
    """The trailers of a call: status, message, then its trailing metadata (which carries
    ``grpc-status-details-bin`` when the status has ``google.rpc`` details)."""
    pairs = [("grpc-status", str(code.value[0]))]
    if details:
        pairs.append(("grpc-message", percent_encode(details)))
    return pairs + _header_block(trailing)


# -- the bridge -------------------------------------------------------------------------------


class GrpcWebBridge:
    """``POST /{package.Service}/{Method}`` as gRPC-web, forwarded over ``channel`` (a loopback
    channel to this gateway's gRPC port, owned by the caller).

    Every method is called as stream-request/stream-response with raw bytes: the kind of a method
    is not on the wire, and this shape carries unary and server-streaming calls alike (the whole
    request body is already in hand, so a client-streaming method would work as well).
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def routes(self) -> list[web.RouteDef]:
        path = (
            r"/{service:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+}/{method:[A-Za-z_][A-Za-z0-9_]*}"
        )
        return [web.post(path, self.handle), web.options(path, self.options)]

    async def options(self, request: web.Request) -> web.Response:
        # Preflights never get here (the CORS middleware answers them); a plain OPTIONS learns
        # what the path accepts.
        return web.Response(status=204, headers={hdrs.ALLOW: "POST, OPTIONS"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mime = request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
        if mime in BINARY_TYPES:
            text = False
        elif mime in TEXT_TYPES:
            text = True
        else:
            # PROTOCOL-HTTP2: a server answers a content type it does not speak with 415.
            return web.Response(
                status=415,
                text="gRPC-web needs application/grpc-web(+proto) or application/grpc-web-text(+proto)\n",
                headers={hdrs.ACCEPT: "application/grpc-web+proto, application/grpc-web-text+proto"},
            )
        text_out = text or "application/grpc-web-text" in request.headers.get(hdrs.ACCEPT, "")
        content_type = "application/grpc-web-text+proto" if text_out else "application/grpc-web+proto"
        try:
            messages, metadata, timeout = await self._read_call(request, text)
        except ProtocolError as exc:
            return _trailers_only(content_type, [], trailer_pairs(exc.code, exc.message, []))
        call = self._call(request.path, messages, metadata, timeout)
        try:
            return await self._relay(request, call, content_type, text_out)
        except asyncio.CancelledError:
            # The browser went away (aiohttp cancels the handler at once): end the server-side
            # call now, so its watcher is released, then let the cancellation through.
            call.cancel()
            raise

    def _call(
        self, path: str, messages: list[bytes], metadata: list[tuple[str, str | bytes]], timeout: float | None
    ) -> _Call:
        """The call on the gateway's own gRPC port. One request message (every unary and
        server-streaming call: gRPC-web has no client streaming) goes out as a unary request,
        in the same batch as the call's metadata: written from a request iterator instead, it
        raced a refusal on the metadata (an unauthenticated call), and grpc's client then
        reported INTERNAL ("Internal error from Core") in place of the server's status."""
        if len(messages) == 1:
            unary: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self._channel.unary_stream(
                path, request_serializer=None, response_deserializer=None
            )
            return unary(messages[0], metadata=metadata, timeout=timeout)  # type: ignore[arg-type]
        streaming: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self._channel.stream_stream(
            path, request_serializer=None, response_deserializer=None
        )
        return streaming(iter(messages), metadata=metadata, timeout=timeout)  # type: ignore[arg-type]

    async def _read_call(
        self, request: web.Request, text: bool
    ) -> tuple[list[bytes], list[tuple[str, str | bytes]], float | None]:
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise ProtocolError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"grpc-web: request body larger than {MAX_REQUEST_BYTES} bytes",
                )
        raw = decode_text(bytes(body)) if text else bytes(body)
        messages: list[bytes] = []
        for flags, payload in parse_frames(raw):
            if flags & FLAG_TRAILER:
                continue  # clients send none; a trailer frame carries nothing a request needs
            if flags & FLAG_COMPRESSED:
                raise ProtocolError(
                    grpc.StatusCode.UNIMPLEMENTED, "grpc-web: compressed messages are not supported"
                )
            messages.append(payload)
        return messages, request_metadata(request), parse_timeout(request.headers.get("grpc-timeout"))

    async def _relay(
        self,
        request: web.Request,
        call: _Call,
        content_type: str,
        text: bool,
    ) -> web.StreamResponse:
        # The async iterator (not ``read()``): ``read()`` reports EOF as soon as the status has
        # arrived, even when a message that came with it was not read yet.
        responses = call.__aiter__()
        first: bytes | None = None
        try:
            first = await anext(responses)
        except StopAsyncIteration:
            pass
        except grpc.aio.AioRpcError:
            pass
        initial = list(await call.initial_metadata())
        if first is None:
            # Nothing to send but the status: a trailers-only reply (HTTP 200, status in headers).
            return _trailers_only(content_type, _header_block(initial), await _trailers(call))

        response = web.StreamResponse(status=200)
        response.content_type = content_type
        response.headers["Cache-Control"] = "no-cache, no-store"
        response.headers["X-Accel-Buffering"] = "no"  # proxies must not hold events back
        for key, value in _header_block(initial):
            response.headers.add(key, value)
        try:
            await response.prepare(request)
            await response.write(_encode(frame(first), text))
            try:
                async for message in responses:
                    await response.write(_encode(frame(message), text))
            except grpc.aio.AioRpcError:
                pass  # the status goes into the trailer frame
            block = "".join(f"{k}: {v}\r\n" for k, v in await _trailers(call))
            await response.write(_encode(frame(block.encode("ascii"), FLAG_TRAILER), text))
            await response.write_eof()
        except ConnectionResetError:
            # The client left between two writes: nobody is listening any more.
            call.cancel()
        return response


def _encode(data: bytes, text: bool) -> bytes:
    return encode_text(data) if text else data


async def _trailers(call: _Call) -> list[tuple[str, str]]:
    code = await call.code()
    details = await call.details()
    trailing = list(await call.trailing_metadata())
    return trailer_pairs(code, details or "", trailing)


def _trailers_only(
    content_type: str, initial: list[tuple[str, str]], trailers: list[tuple[str, str]]
) -> web.Response:
    response = web.Response(status=200, body=b"")
    response.content_type = content_type
    response.headers["Cache-Control"] = "no-cache, no-store"
    for key, value in (*initial, *trailers):
        response.headers.add(key, value)
    return response


def loopback_channel(listen_addr: str, port: int) -> grpc.aio.Channel:
    """A channel to this gateway's own gRPC port (``listen_addr`` as configured, ``port`` as
    bound), for the gRPC-web bridge and the REST routes. A wildcard listen address is reached
    through 127.0.0.1."""
    host = listen_addr.rpartition(":")[0]
    if host in {"", "0.0.0.0", "::", "[::]"}:
        host = "127.0.0.1"
    return grpc.aio.insecure_channel(
        f"{host}:{port}",
        options=[
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ("grpc.primary_user_agent", "charai-gateway-http"),
        ],
    )
