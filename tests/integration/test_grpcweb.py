"""gRPC-web, REST streaming, CORS and the console on the gateway's HTTP port, spoken by hand.

An in-process stack: real nats-server, TaskStoreApp and GatewayApp on port 0 (no workers, so tasks
stay queued until the test cancels them), driven with aiohttp exactly as a browser library would:
frames, per-frame base64 in text mode, trailers, preflights, a closed tab.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yarl
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings as StoreSettings
from charai.taskapi import status_details
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from pydantic import SecretStr

from tests.conftest import NatsServer, eventually

SERVICE = "/charai.tasks.v1.TaskService"
TOKEN_A = "token-of-tenant-a"
TOKEN_B = "token-of-tenant-b"
ALLOWED = "http://console.example"
REFUSED = "http://evil.example"
BINARY = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"


@dataclasses.dataclass
class Env:
    gateway: GatewayApp
    http: aiohttp.ClientSession
    base: str
    console_dir: Path
    settings: GatewaySettings

    async def open_streams(self) -> int:
        async with self.http.get(f"{self.base}/healthz") as resp:
            body = await resp.json()
        return int(body["open_watch_streams"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("grpcweb")
    nats = NatsServer(tmp / "nats")
    nats.start()
    try:
        store_settings = StoreSettings(
            nats_url=nats.url,
            data_dir=tmp,
            database_url=f"sqlite:///{tmp / 'tasks.db'}",
            shutdown_grace_seconds=1.0,
        )
        async with TaskStoreApp(store_settings, listen_addr="127.0.0.1:0") as store:
            settings = GatewaySettings(
                nats_url=nats.url,
                data_dir=tmp,
                task_store_addr=f"127.0.0.1:{store.port}",
                gateway_grpc_addr="127.0.0.1:0",
                gateway_http_addr="127.0.0.1:0",
                api_keys=SecretStr(f"{TOKEN_A}=tenant-a,{TOKEN_B}=tenant-b"),
                cors_origins=ALLOWED,
                watch_heartbeat_seconds=0.3,
                media_signing_key="test-signing-key",
                shutdown_grace_seconds=1.0,
                console_dir=tmp / "console",
            )
            async with GatewayApp(settings) as gateway, aiohttp.ClientSession() as http:
                yield Env(gateway, http, f"http://127.0.0.1:{gateway.http_port}", tmp / "console", settings)
    finally:
        nats.stop()


# -- a hand-written gRPC-web client ----------------------------------------------------------


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def headers(text: bool = False, token: str | None = TOKEN_A, **extra: str) -> dict[str, str]:
    out = {
        "Content-Type": TEXT if text else BINARY,
        "Accept": TEXT if text else BINARY,
        "X-Grpc-Web": "1",
        "X-User-Agent": "grpc-web-javascript/0.1",
    }
    if token is not None:
        out["Authorization"] = f"Bearer {token}"
    out.update(extra)
    return out


def body_of(message: Message, text: bool) -> bytes:
    raw = frame(message.SerializeToString())
    return base64.b64encode(raw) if text else raw


class FrameReader:
    """Reads a gRPC-web response frame by frame as it arrives.

    In text mode every frame must be its own padded base64 segment: the reader decodes exactly
    one frame's characters at a time, so a server that encoded the stream as a whole fails here.
    """

    def __init__(self, resp: aiohttp.ClientResponse, text: bool) -> None:
        self.resp = resp
        self.text = text

    async def next(self) -> tuple[int, bytes] | None:
        content = self.resp.content
        if not self.text:
            try:
                head = await content.readexactly(5)
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", "stream ended inside a frame header"
                return None
            flags, length = struct.unpack(">BI", head)
            return flags, await content.readexactly(length)
        try:
            first = await content.readexactly(8)
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"", "stream ended inside a base64 frame"
            return None
        start = base64.b64decode(first, validate=True)
        flags, length = struct.unpack(">BI", start[:5])
        total_chars = 4 * -(-(5 + length) // 3)
        segment = first + await content.readexactly(total_chars - 8)
        decoded = base64.b64decode(segment, validate=True)
        assert len(decoded) == 5 + length
        return flags, decoded[5:]


@dataclasses.dataclass
class Reply:
    http_status: int
    headers: dict[str, str]
    messages: list[bytes]
    trailers: dict[str, str]
    trailers_only: bool

    @property
    def status(self) -> int:
        return int(self.trailers["grpc-status"])

    @property
    def message(self) -> str:
        return urllib.parse.unquote(self.trailers.get("grpc-message", ""))

    def rich_status(self) -> status_pb2.Status:
        raw = self.trailers["grpc-status-details-bin"]
        return status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))


def parse_trailer_block(payload: bytes) -> dict[str, str]:
    trailers = {}
    for line in payload.decode("ascii").split("\r\n"):
        if line:
            key, _, value = line.partition(":")
            trailers[key.strip().lower()] = value.strip()
    return trailers


async def read_reply(resp: aiohttp.ClientResponse, text: bool) -> Reply:
    hdrs = {k.lower(): v for k, v in resp.headers.items()}
    if "grpc-status" in hdrs:
        assert await resp.read() == b"", "a trailers-only reply has an empty body"
        return Reply(resp.status, hdrs, [], hdrs, True)
    reader = FrameReader(resp, text)
    messages: list[bytes] = []
    trailers: dict[str, str] | None = None
    while (item := await reader.next()) is not None:
        flags, payload = item
        assert trailers is None, "nothing may follow the trailer frame"
        if flags & 0x80:
            trailers = parse_trailer_block(payload)
        else:
            messages.append(payload)
    assert trailers is not None, "the stream ended without a trailer frame"
    return Reply(resp.status, hdrs, messages, trailers, False)


async def call(
    env: Env, method: str, request: Message, *, text: bool = False, path: str = SERVICE, **hdrs: Any
) -> Reply:
    async with env.http.post(
        f"{env.base}{path}/{method}", data=body_of(request, text), headers=headers(text, **hdrs)
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await read_reply(resp, text)


def image_request(character_id: str = "char_001", prompt: str = "a swordsman, front view") -> Message:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        image=task_pb2.ImagePayload(
            character_id=character_id,
            character_name="Li Ming",
            prompt=prompt,
            resolution="1024x1024",
            view_type="front",
        ),
    )


async def create(env: Env, character_id: str = "char_001", text: bool = False) -> task_pb2.Task:
    reply = await call(env, "CreateTask", image_request(character_id), text=text)
    assert reply.status == 0, reply.trailers
    return task_service_pb2.CreateTaskResponse.FromString(reply.messages[0]).task


def event_of(payload: bytes) -> task_pb2.TaskEvent:
    return task_service_pb2.WatchTaskResponse.FromString(payload).event


# -- unary ------------------------------------------------------------------------------------


async def test_unary_calls_in_binary_and_text_mode(env: Env) -> None:
    async def round_trip(text: bool) -> None:
        created = await call(env, "CreateTask", image_request("char_unary"), text=text)
        assert (created.status, created.trailers_only, len(created.messages)) == (0, False, 1)
        assert created.headers["content-type"] == (
            "application/grpc-web-text+proto" if text else "application/grpc-web+proto"
        )
        task = task_service_pb2.CreateTaskResponse.FromString(created.messages[0]).task
        assert task.status == task_pb2.TASK_STATUS_QUEUED
        assert task.image.prompt == "a swordsman, front view"
        got = await call(env, "GetTask", task_service_pb2.GetTaskRequest(id=task.id), text=text)
        assert got.status == 0
        assert task_service_pb2.GetTaskResponse.FromString(got.messages[0]).task.id == task.id

    await asyncio.gather(round_trip(False), round_trip(True))


async def test_text_request_padded_per_frame_is_decoded_whole(env: Env) -> None:
    # A client may pad each piece on its own: the 5-byte header alone encodes to 'xxxxxxx=', and
    # a decoder that stops at the first '=' would lose the message.
    message = image_request("char_padding").SerializeToString()
    header = struct.pack(">BI", 0, len(message))
    body = base64.b64encode(header) + base64.b64encode(message)
    assert b"=" in body[:-2]
    async with env.http.post(f"{env.base}{SERVICE}/CreateTask", data=body, headers=headers(True)) as resp:
        reply = await read_reply(resp, True)
    assert reply.status == 0, reply.message
    assert task_service_pb2.CreateTaskResponse.FromString(reply.messages[0]).task.image.character_id == (
        "char_padding"
    )


# -- errors -----------------------------------------------------------------------------------


async def test_invalid_argument_is_trailers_only_with_bad_request_details(env: Env) -> None:
    reply = await call(env, "CreateTask", image_request(prompt=""))
    assert reply.trailers_only and reply.http_status == 200
    assert reply.status == code_pb2.INVALID_ARGUMENT
    assert "image.prompt" in reply.message
    assert reply.headers["content-type"] == "application/grpc-web+proto"
    rich = reply.rich_status()
    assert rich.code == code_pb2.INVALID_ARGUMENT
    assert [field for field, _ in status_details(rich).field_violations] == ["image.prompt"]


async def test_same_auth_and_tenancy_as_the_grpc_port(env: Env) -> None:
    task = await create(env)
    anonymous, wrong, foreign = await asyncio.gather(
        call(env, "GetTask", task_service_pb2.GetTaskRequest(id=task.id), token=None),
        call(env, "GetTask", task_service_pb2.GetTaskRequest(id=task.id), token="nope"),
        call(env, "GetTask", task_service_pb2.GetTaskRequest(id=task.id), token=TOKEN_B, text=True),
    )
    assert (anonymous.status, wrong.status) == (code_pb2.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED)
    assert "bearer" in anonymous.message.lower()
    assert foreign.status == code_pb2.NOT_FOUND and foreign.trailers_only


async def test_unknown_method_and_service_are_unimplemented(env: Env) -> None:
    request = task_service_pb2.GetTaskRequest(id="task_" + "0" * 32)
    method, service = await asyncio.gather(
        call(env, "Frobnicate", request),
        call(env, "GetTask", request, path="/no.such.v1.Service", text=True),
    )
    assert (method.status, service.status) == (code_pb2.UNIMPLEMENTED, code_pb2.UNIMPLEMENTED)


async def test_bad_requests_are_refused_cleanly(env: Env) -> None:
    url = f"{env.base}{SERVICE}/GetTask"
    async with env.http.post(url, data=b"{}", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 415
    async with env.http.post(url, data=b"!!not base64!!", headers=headers(True)) as resp:
        reply = await read_reply(resp, True)
    assert reply.status == code_pb2.INTERNAL and "base64" in reply.message
    async with env.http.post(url, data=b"\x00\x00\x00\x00\x09abc", headers=headers()) as resp:
        reply = await read_reply(resp, False)
    assert reply.status == code_pb2.INTERNAL and "truncated" in reply.message


def test_grpc_message_percent_encoding() -> None:
    from charai.gateway.grpcweb import percent_encode

    assert percent_encode("image.prompt: 100% été\n") == "image.prompt: 100%25 %C3%A9t%C3%A9%0A"


# -- streams ----------------------------------------------------------------------------------


async def test_watch_stream_flushes_each_event_then_trailers(env: Env) -> None:
    async def watch(text: bool) -> None:
        task = await create(env, f"char_watch_{int(text)}")
        request = task_service_pb2.WatchTaskRequest(id=task.id)
        async with env.http.post(
            f"{env.base}{SERVICE}/WatchTask", data=body_of(request, text), headers=headers(text)
        ) as resp:
            assert resp.status == 200 and "grpc-status" not in resp.headers
            reader = FrameReader(resp, text)
            first = await reader.next()  # arrives while the stream is still open
            assert first is not None and first[0] == 0
            snapshot = event_of(first[1])
            assert snapshot.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT
            assert snapshot.task.status == task_pb2.TASK_STATUS_QUEUED
            cancelled = await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))
            assert cancelled.status == 0
            events = []
            trailers: dict[str, str] = {}
            while (item := await reader.next()) is not None:
                if item[0] & 0x80:
                    trailers = parse_trailer_block(item[1])
                else:
                    event = event_of(item[1])
                    if event.type != task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                        events.append(event)
        assert [e.type for e in events] == [task_pb2.TASK_EVENT_TYPE_CANCELLED]
        assert events[0].sequence > snapshot.sequence
        assert trailers["grpc-status"] == "0"

    await asyncio.gather(watch(False), watch(True))
    await eventually(lambda: env.gateway.hub is not None and env.gateway.hub.open_streams == 0, 2)


async def test_watch_tasks_delivers_new_tasks_live(env: Env) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    request = task_service_pb2.WatchTasksRequest(metadata={"characterId": character})
    async with env.http.post(
        f"{env.base}{SERVICE}/WatchTasks", data=body_of(request, True), headers=headers(True)
    ) as resp:
        reader = FrameReader(resp, True)
        first = await reader.next()  # the idle stream's heartbeat: headers and frames flow
        assert first is not None
        assert event_of(first[1]).type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT
        task = await create(env, character)
        async with asyncio.timeout(5):
            while True:
                item = await reader.next()
                assert item is not None and not item[0] & 0x80
                event = event_of(item[1])
                if event.type != task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                    break
        assert (event.type, event.task.id) == (task_pb2.TASK_EVENT_TYPE_QUEUED, task.id)
    await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))


async def test_grpc_timeout_ends_a_stream_with_deadline_exceeded(env: Env) -> None:
    task = await create(env)
    request = task_service_pb2.WatchTaskRequest(id=task.id)
    start = time.monotonic()
    short, longer = await asyncio.gather(
        call(env, "WatchTask", request, text=False, **{"Grpc-Timeout": "1m"}),  # text named: not in the dict
        call(env, "WatchTask", request, text=True, **{"Grpc-Timeout": "600m"}),
    )
    elapsed = time.monotonic() - start
    # The task stays queued (no workers): only the deadline can end these streams, and the
    # longer one not before its 600 ms.
    assert short.status == code_pb2.DEADLINE_EXCEEDED
    assert longer.status == code_pb2.DEADLINE_EXCEEDED and not longer.trailers_only
    assert event_of(longer.messages[0]).type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT
    assert elapsed >= 0.55
    await eventually(lambda: env.gateway.hub is not None and env.gateway.hub.open_streams == 0, 2)
    await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))


async def test_closed_tab_releases_the_server_stream_at_once(env: Env) -> None:
    """A gateway of its own whose heartbeats are an hour apart, on a task that stays queued: the
    server never writes to these streams again, so only noticing the closed connection itself
    (not a failed heartbeat write, not the task ending) can release them."""
    quiet = env.settings.model_copy(update={"watch_heartbeat_seconds": 3600.0})
    async with GatewayApp(quiet) as gateway:
        base = f"http://127.0.0.1:{gateway.http_port}"
        task = await create(env)
        assert await _open_streams(env, base) == 0
        responses = []
        for text in (False, True):
            request = task_service_pb2.WatchTaskRequest(id=task.id)
            resp = await env.http.post(
                f"{base}{SERVICE}/WatchTask", data=body_of(request, text), headers=headers(text)
            )
            assert await FrameReader(resp, text).next() is not None  # the snapshot: the stream is open
            responses.append(resp)
        sse = await env.http.get(f"{base}/api/tasks/{task.id}/events", headers=rest_auth())
        assert sse.headers["content-type"].startswith("text/event-stream")
        assert (await sse.content.readuntil(b"\n\n")).startswith(b"retry:")
        responses.append(sse)
        assert await _open_streams(env, base) == 3
        for resp in responses:
            resp.close()  # the tab goes away: the TCP connection closes, nothing else is said
        await eventually(lambda: _zero(env, base), interval=0.02)
        await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))


async def _open_streams(env: Env, base: str) -> int:
    async with env.http.get(f"{base}/healthz") as resp:
        body = await resp.json()
    return int(body["open_watch_streams"])


async def _zero(env: Env, base: str) -> bool:
    return await _open_streams(env, base) == 0


# -- REST streaming details that need an idle task (no workers here) -------------------------


def rest_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN_A}"}


async def test_sse_sends_heartbeat_comments_on_an_idle_task(env: Env) -> None:
    task = await create(env)
    async with env.http.get(f"{env.base}/api/tasks/{task.id}/events", headers=rest_auth()) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"].startswith("no-cache")
        blocks: list[bytes] = []
        async with asyncio.timeout(5):
            while not any(b.startswith(b": heartbeat") for b in blocks):
                blocks.append(await resp.content.readuntil(b"\n\n"))
    snapshot = blocks[1].decode().splitlines()
    assert snapshot[0].startswith("id: ") and snapshot[1] == "event: task:progress"
    assert snapshot[2].startswith('data: {"taskId":"' + task.id)
    await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))


async def test_rest_uses_the_same_auth(env: Env) -> None:
    async with env.http.get(f"{env.base}/api/tasks") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
    task = await create(env)
    async with env.http.get(
        f"{env.base}/api/tasks/{task.id}", headers={"Authorization": f"Bearer {TOKEN_B}"}
    ) as r:
        assert r.status == 404
    await call(env, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id))


# -- CORS -------------------------------------------------------------------------------------


async def test_cors_preflight_and_exposed_headers(env: Env) -> None:
    asked = "content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked,
    }
    url = f"{env.base}{SERVICE}/CreateTask"
    async with env.http.options(url, headers={"Origin": ALLOWED, **preflight}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert {"POST", "OPTIONS"} <= {
            m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")
        }
        assert resp.headers["Access-Control-Allow-Headers"] == asked
        assert resp.headers["Access-Control-Max-Age"] == "86400"
        assert "Origin" in resp.headers["Vary"]
    async with env.http.options(url, headers={"Origin": REFUSED, **preflight}) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with env.http.options(f"{env.base}/api/tasks", headers={"Origin": ALLOWED, **preflight}) as resp:
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "GET" in resp.headers["Access-Control-Allow-Methods"]

    reply_headers: dict[str, str] = {}
    async with env.http.post(
        url, data=body_of(image_request(prompt=""), False), headers=headers(Origin=ALLOWED)
    ) as resp:
        reply_headers = dict(resp.headers)
    assert reply_headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = {h.strip().lower() for h in reply_headers["Access-Control-Expose-Headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    async with env.http.post(
        url, data=body_of(image_request(), False), headers=headers(Origin=REFUSED)
    ) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    # The console's own calls are same-origin: no CORS headers needed, never refused.
    same = headers(Origin="https://" + env.base.removeprefix("http://"))
    async with env.http.post(url, data=body_of(image_request(prompt=""), False), headers=same) as resp:
        assert resp.status == 200 and resp.headers["grpc-status"] == "3"
        assert "Access-Control-Allow-Origin" not in resp.headers


# -- the console ------------------------------------------------------------------------------


async def test_console_static_files(env: Env) -> None:
    async with env.http.get(f"{env.base}/") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "make console" in await resp.text()
    (env.console_dir / "assets").mkdir(parents=True)
    (env.console_dir / "index.html").write_text("<!doctype html><title>console</title>")
    (env.console_dir / "assets" / "app.js").write_text("console.log('hi')")
    (env.console_dir / "assets" / "app.css").write_text("body{}")
    (env.console_dir / ".env").write_text("SECRET=1")
    (env.console_dir.parent / "outside.txt").write_text("outside")
    expected = {
        "/": ("text/html", "<!doctype html><title>console</title>"),
        "/index.html": ("text/html", "<!doctype html><title>console</title>"),
        "/assets/app.js": ("text/javascript", "console.log('hi')"),
        "/assets/app.css": ("text/css", "body{}"),
    }
    for path, (content_type, text) in expected.items():
        async with env.http.get(f"{env.base}{path}") as resp:
            assert resp.status == 200, path
            assert resp.content_type == content_type
            assert await resp.text() == text
    for path in (
        "/assets/",
        "/assets",
        "/.env",
        "/missing.js",
        "/%2e%2e/outside.txt",
        "/assets/%2e%2e/%2e%2e/outside.txt",
    ):
        async with env.http.get(yarl.URL(f"{env.base}{path}", encoded=True)) as resp:
            assert resp.status == 404, path
    async with env.http.get(f"{env.base}/healthz") as resp:  # other routes still win
        assert (await resp.json())["status"] == "serving"
