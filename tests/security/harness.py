"""An in-process charai for the abuse and security tests, and small clients that speak each of
its transports by hand (raw gRPC bytes, binary gRPC-web frames, REST).

Everything is real: nats-server on a free port, TaskStoreApp on SQLite, GatewayApp on port 0,
optionally the provider emulator and a TTS WorkerApp with the real handler. The services share
the process (fast to start, direct access to their parts) but talk over loopback TCP as in
production, with the internal token set as ``make run`` sets it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import struct
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from charai.core.clock import SYSTEM, Clock
from charai.core.storeclient import StoreClient
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings as StoreSettings
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.tts_worker.app import build as build_tts_worker
from charai.worker.app import WorkerApp
from charai.worker.settings import TtsWorkerSettings
from google.protobuf.message import Message
from google.rpc import status_pb2
from pydantic import SecretStr

from tests.conftest import NatsServer

SERVICE = "/charai.tasks.v1.TaskService"
TOKEN_A = f"tok-a-{uuid.uuid4().hex}"
TOKEN_B = f"tok-b-{uuid.uuid4().hex}"
TENANT_A, TENANT_B = "tenant-a", "tenant-b"
INTERNAL_TOKEN = f"internal-{uuid.uuid4().hex}"
SIGNING_KEY = f"signing-{uuid.uuid4().hex}"
GRPC_WEB = "application/grpc-web+proto"


@dataclasses.dataclass
class Charai:
    """A running in-process stack and clients of it."""

    nats: NatsServer
    store_app: TaskStoreApp
    gateway: GatewayApp
    store: StoreClient
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    data_dir: Path
    emulator: RunningEmulator | None = None
    worker_settings: TtsWorkerSettings | None = None
    worker: WorkerApp | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    async def open_streams(self) -> int:
        async with self.http.get(f"{self.base}/healthz") as resp:
            return int((await resp.json())["open_watch_streams"])

    async def open_streams_is(self, count: int) -> bool:
        return await self.open_streams() == count

    async def start_worker(self) -> WorkerApp:
        assert self.worker_settings is not None, "started without a worker"
        settings = self.worker_settings.model_copy(update={"worker_id": f"sec-{uuid.uuid4().hex[:6]}"})
        self.worker = build_tts_worker(settings)
        await self.worker.start()
        return self.worker

    async def crash_worker(self) -> None:
        """The worker dies as under ``kill -9`` (:func:`crash_worker`)."""
        app, self.worker = self.worker, None
        assert app is not None
        await crash_worker(app)

    async def stored(self, tenant: str, task_id: str) -> task_pb2.Task:
        return await self.store.get_task(tenant, task_id)

    async def store_events(self, tenant: str, task_id: str) -> list[task_pb2.TaskEvent]:
        events: list[task_pb2.TaskEvent] = []
        after = 0
        while True:
            response = await self.store.list_events(
                spb.ListEventsRequest(tenant=tenant, task_id=task_id, after_sequence=after, limit=500)
            )
            events += response.events
            if len(response.events) < 500:
                return events
            after = response.events[-1].sequence


@contextlib.asynccontextmanager
async def running_charai(
    tmp: Path,
    *,
    gateway: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None,
    with_worker: bool = False,
    worker: Mapping[str, Any] | None = None,
    gateway_clock: Clock = SYSTEM,
) -> AsyncIterator[Charai]:
    """nats-server, task_store and gateway (tokens A and B), plus the emulator and a TTS worker
    settings object when ``with_worker`` (the worker itself starts with ``start_worker``)."""
    nats = NatsServer(tmp / "nats")
    nats.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            store_values: dict[str, Any] = {
                "nats_url": nats.url,
                "data_dir": tmp,
                "database_url": f"sqlite:///{tmp / 'tasks.db'}",
                "internal_token": INTERNAL_TOKEN,
                "shutdown_grace_seconds": 1.0,
            }
            store_app = await stack.enter_async_context(
                TaskStoreApp(StoreSettings(**{**store_values, **(store or {})}), listen_addr="127.0.0.1:0")
            )
            gateway_values: dict[str, Any] = {
                "nats_url": nats.url,
                "data_dir": tmp,
                "task_store_addr": f"127.0.0.1:{store_app.port}",
                "gateway_grpc_addr": "127.0.0.1:0",
                "gateway_http_addr": "127.0.0.1:0",
                "api_keys": SecretStr(f"{TOKEN_A}={TENANT_A},{TOKEN_B}={TENANT_B}"),
                "internal_token": INTERNAL_TOKEN,
                "media_signing_key": SIGNING_KEY,
                # Expiring media URLs (the default never expires): the tamper tests move the expiry.
                "media_url_ttl": 3600,
                "watch_heartbeat_seconds": 0.5,
                "shutdown_grace_seconds": 1.0,
                "console_dir": tmp / "console",
            }
            settings = GatewaySettings(**{**gateway_values, **(gateway or {})})
            gateway_app = await stack.enter_async_context(GatewayApp(settings, clock=gateway_clock))
            client = await stack.enter_async_context(
                StoreClient(f"127.0.0.1:{store_app.port}", INTERNAL_TOKEN)
            )
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_app.grpc_port}")
            stack.push_async_callback(channel.close)
            http = await stack.enter_async_context(aiohttp.ClientSession())
            charai = Charai(nats, store_app, gateway_app, client, channel, http, tmp)
            if with_worker:
                emulator = await stack.enter_async_context(
                    running_emulator(EmulatorConfig(latency_min=0.02, latency_max=0.08))
                )
                charai.emulator = emulator
                worker_values: dict[str, Any] = {
                    "nats_url": nats.url,
                    "data_dir": tmp,
                    "task_store_addr": f"127.0.0.1:{store_app.port}",
                    "internal_token": INTERNAL_TOKEN,
                    "tts_api_base_url": emulator.api_base,
                    "tts_api_key": SecretStr("sk-test-provider-key"),
                    "provider_allow_private_urls": True,
                    "ack_wait_seconds": 1.0,
                    "long_poll_seconds": 0.5,
                    "shutdown_grace_seconds": 1.0,
                }
                charai.worker_settings = TtsWorkerSettings(**{**worker_values, **(worker or {})})

                async def stop_worker() -> None:
                    if charai.worker is not None:
                        await charai.worker.close()

                stack.push_async_callback(stop_worker)
            yield charai
    finally:
        nats.stop()


# -- requests ---------------------------------------------------------------------------------


def tts_request(character_id: str = "char_sec", text: str = "hello there", **extra: Any) -> Any:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(character_id=character_id, text=text, voice_style="tongtong"),
        **extra,
    )


def image_request(character_id: str = "char_sec", prompt: str = "a swordsman, front view") -> Any:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        image=task_pb2.ImagePayload(
            character_id=character_id, prompt=prompt, resolution="1024x1024", view_type="front"
        ),
    )


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


# -- raw gRPC ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    """What a call came to, whatever the transport."""

    code: grpc.StatusCode
    message: str
    messages: list[bytes]
    details: status_pb2.Status | None = None
    http_status: int = 200
    #: A REST refusal's ``error`` object (its ``reason`` is ErrorInfo's).
    rest: dict[str, Any] | None = None

    def first(self, cls: type[Any]) -> Any:
        return cls.FromString(self.messages[0])


_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def grpc_unary(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes | Message,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One unary call with raw bytes in and out (so the request may be anything at all)."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{SERVICE}/{method}")
    try:
        reply = await call(raw, metadata=metadata or [], timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code(), exc.details() or "", [], _rich(exc.trailing_metadata()))
    return Answer(grpc.StatusCode.OK, "", [reply])


async def grpc_stream_first(
    channel: grpc.aio.Channel,
    method: str,
    request: Message,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """Opens a server stream and returns its status after the first message (then cancels it)."""
    open_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"{SERVICE}/{method}")
    call = open_stream(request.SerializeToString(), metadata=metadata or [], timeout=timeout)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code(), exc.details() or "", [], _rich(exc.trailing_metadata()))
    if first is grpc.aio.EOF:
        code = await call.code()
        return Answer(code, await call.details() or "", [])
    assert isinstance(first, bytes)  # no deserializer: the raw message
    call.cancel()
    return Answer(grpc.StatusCode.OK, "", [first])


def _rich(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


# -- gRPC-web (binary) ------------------------------------------------------------------------


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


async def grpcweb(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    request: bytes | Message,
    token: str | None,
    *,
    first_only: bool = False,
    headers: Mapping[str, str] | None = None,
    ssl: Any = None,
    service: str = SERVICE,
) -> Answer:
    """A binary gRPC-web call; with ``first_only`` a stream is read up to its first message."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    sent = {"Content-Type": GRPC_WEB, "Accept": GRPC_WEB, "X-Grpc-Web": "1"}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    # A file-like body: aiohttp warns about (and the test settings turn into errors) raw bytes
    # over 1 MiB, and the abuse tests send such bodies on purpose.
    body = io.BytesIO(frame(raw))
    async with http.post(f"{base}{service}/{method}", data=body, headers=sent, ssl=ssl) as resp:
        if resp.status != 200:
            return Answer(grpc.StatusCode.UNKNOWN, await resp.text(), [], http_status=resp.status)
        if "grpc-status" in resp.headers:  # trailers-only
            return _web_answer(dict(resp.headers), [])
        messages: list[bytes] = []
        while True:
            try:
                head = await resp.content.readexactly(5)
            except asyncio.IncompleteReadError:
                raise AssertionError("a gRPC-web reply ended without its trailer frame") from None
            flags, length = struct.unpack(">BI", head)
            payload = await resp.content.readexactly(length)
            if flags & 0x80:
                trailers = {}
                for line in payload.decode("ascii").split("\r\n"):
                    key, _, value = line.partition(":")
                    if key:
                        trailers[key.strip().lower()] = value.strip()
                return _web_answer(trailers, messages)
            messages.append(payload)
            if first_only:
                return Answer(grpc.StatusCode.OK, "", messages)


def _web_answer(trailers: Mapping[str, str], messages: list[bytes]) -> Answer:
    lower = {k.lower(): v for k, v in trailers.items()}
    details = None
    if "grpc-status-details-bin" in lower:
        raw = lower["grpc-status-details-bin"]
        details = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    return Answer(
        _CODES[int(lower["grpc-status"])],
        urllib.parse.unquote(lower.get("grpc-message", "")),
        messages,
        details,
    )


async def crash_worker(app: WorkerApp) -> None:
    """A worker app dies as under ``kill -9``, in process: its NATS connection drops first (no
    ack, no nak can leave), then its task_store channel (no report, no hand-back), then every
    task it runs is cancelled. JetStream redelivers what it held after the ack wait; the store
    hands the task on when the attempt's lease expires."""
    assert app.runner is not None
    runner = app.runner
    await app._nc.close()  # type: ignore[union-attr]
    await app._store.close()  # type: ignore[union-attr]
    doomed = [*runner._tasks, *runner._job_tasks]
    for task in doomed:
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    await app._session.close()  # type: ignore[union-attr]
    app._closed = True  # nothing left to close
