"""Secrets stay secret, and the internal API is closed, through the processes ``make run`` starts.

A canary provider key and a canary client token are used through a whole run with failures —
client auth failures on every transport (including tokens that contain the canary), content
rejections, provider 401s and 500s, bad provider bodies — at debug log level. Afterwards neither
canary (nor the generated internal token) appears in:

* any log line of any process (``Stack`` captures stdout and stderr of each);
* any answer a client saw: gRPC status messages and details, gRPC-web trailers, REST bodies;
* any event (the stored log, and every message published on NATS during the run);
* the SQLite database file (with its WAL);
* any JetStream message (every stream, so the jobs, the media object store's chunks and
  metadata, and the KV buckets) — read back message by message.

The provider is the emulator, in this process, demanding the canary key: a task completes only
if the worker sent it, so the key was really in use.

The internal task_store API: ``Stack`` gives every service a random ``CHARAI_INTERNAL_TOKEN``;
a caller without it (or with a wrong one) gets UNAUTHENTICATED, health stays open, and the
gateway and workers (which have it) do their work.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import pytest
import pytest_asyncio
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.devstack.stack import Stack
from charai.emulator import EmulatorConfig, running_emulator
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from nats.js.api import StreamInfo

from tests.conftest import eventually
from tests.security.harness import grpcweb, image_request, tts_request

CANARY_KEY = f"sk-canary-{uuid.uuid4().hex}"
CANARY_TOKEN = f"tok-canary-{uuid.uuid4().hex}"
TENANT = "tenant-canary"


class Run:
    """A stack and everything the run produced that a secret could leak into."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.client_saw: list[str] = []  # every error message, trailer and body a client got
        self.nats_seen: list[bytes] = []  # every message published on NATS during the run
        self.task_ids: list[str] = []
        self.outcomes: dict[str, Any] = {}

    @property
    def internal_token(self) -> str:
        return self.stack.env["CHARAI_INTERNAL_TOKEN"]

    @property
    def secrets(self) -> dict[str, str]:
        return {
            "provider key": CANARY_KEY,
            "client token": CANARY_TOKEN,
            "internal token": self.internal_token,
        }

    def leaks(self, where: str, data: bytes | str) -> list[str]:
        blob = data if isinstance(data, bytes) else data.encode("utf-8", "replace")
        return [f"{name} in {where}" for name, value in self.secrets.items() if value.encode() in blob]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    data = Path(tmp_path_factory.mktemp("secrets"))
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    config = EmulatorConfig(latency_min=0.02, latency_max=0.06, async_poll_steps=1, api_key=CANARY_KEY)
    async with running_emulator(config) as emulator:
        env = {
            "CHARAI_API_KEYS": f"{CANARY_TOKEN}={TENANT}",
            "CHARAI_IMAGE_API_KEY": CANARY_KEY,
            "CHARAI_TTS_API_KEY": CANARY_KEY,
            "CHARAI_IMAGE_API_BASE_URL": emulator.api_base,
            "CHARAI_TTS_API_BASE_URL": emulator.api_base,
            "CHARAI_PROVIDER_ALLOW_PRIVATE_URLS": "true",
            "CHARAI_LOG_LEVEL": "debug",
            "CHARAI_MAX_ATTEMPTS": "2",
            "CHARAI_RETRY_BASE_SECONDS": "0.1",
            "CHARAI_RETRY_CAP_SECONDS": "0.3",
            "CHARAI_ACK_WAIT_SECONDS": "3",
            "CHARAI_LEASE_SECONDS": "3",
            "CHARAI_IMAGE_POLL_SECONDS": "0.1",
            "CHARAI_IMAGE_TIMEOUT_SECONDS": "5",
            "CHARAI_TTS_TIMEOUT_SECONDS": "5",
        }
        async with Stack(data, env, echo=echo) as stack:
            assert not stack.emulator_url, "the stack must use the canary-keyed emulator"
            yield Run(stack)


async def exercise(run: Run) -> None:
    """Submits tasks that succeed and fail in every way, and calls that fail authentication."""
    stack = run.stack
    nc = await nats.connect(stack.nats_url)
    events_subject = Topology().events_subject
    ended_on_nats: set[str] = set()  # tasks whose terminal event the subscription received

    async def record(msg: Any) -> None:
        run.nats_seen.append(msg.subject.encode() + b" " + repr(msg.headers).encode() + b" " + msg.data)
        if msg.subject == events_subject:
            for envelope in spb.EventBatch.FromString(msg.data).envelopes:
                if envelope.event.type in TERMINAL_EVENTS:
                    ended_on_nats.add(envelope.event.task.id)

    sub = await nc.subscribe(">", cb=record)
    try:
        good = [("Bearer " + CANARY_TOKEN)]
        bad = [
            f"Bearer {CANARY_TOKEN}x",
            f"Basic {CANARY_TOKEN}",
            CANARY_TOKEN,
            f"Bearer {CANARY_TOKEN[:-1]}",
        ]
        async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            requests = [
                tts_request(text="a good voice"),
                image_request(prompt="a good image"),
                tts_request(text="rejected [[content]]"),
                image_request(prompt="rejected [[content]]"),
                tts_request(text="provider 500 once [[server*1]]"),
                tts_request(text="provider 500 always [[server]]"),
                image_request(prompt="garbage body [[garbage]]"),
                tts_request(text="json error in a 200 [[json-error-200]]"),
                image_request(prompt="redirected [[redirect]]"),
            ]
            # Last, once the others ended: a refused key opens its credential's breaker, and the
            # tasks after it would fail without calling the provider (README, "Providers are shared").
            refusals = [
                tts_request(text="provider says 401 [[auth]]"),
                image_request(prompt="provider says 403 [[forbidden]]"),
            ]
            for batch in (requests, refusals):
                ids = [
                    (await stub.CreateTask(request, metadata=[("authorization", good[0])])).task.id
                    for request in batch
                ]
                run.task_ids.extend(ids)

                async def batch_ended(ids: list[str] = ids) -> bool:
                    for i in ids:
                        got = await stub.GetTask(
                            task_service_pb2.GetTaskRequest(id=i), metadata=[("authorization", good[0])]
                        )
                        if got.task.status not in TERMINAL_STATUSES:
                            return False
                    return True

                await eventually(batch_ended, timeout=40, interval=0.2)
            for authorization in bad:
                for call in (
                    stub.CreateTask(tts_request(), metadata=[("authorization", authorization)]),
                    stub.GetTask(
                        task_service_pb2.GetTaskRequest(id=run.task_ids[0]),
                        metadata=[("authorization", authorization)],
                    ),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    run.client_saw.append(f"{refused.value.details()} {refused.value.trailing_metadata()!r}")
            invalid = tts_request(text="")
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await stub.CreateTask(invalid, metadata=[("authorization", good[0])])
            run.client_saw.append(f"{rejected.value.details()} {rejected.value.trailing_metadata()!r}")
            async with aiohttp.ClientSession() as http:
                base = stack.gateway_http
                for authorization in [*bad, good[0]]:
                    headers = {"Authorization": authorization}
                    async with http.post(f"{base}/api/tasks", json={"type": "nope"}, headers=headers) as resp:
                        run.client_saw.append(f"{dict(resp.headers)!r} {await resp.text()}")
                    async with http.get(
                        f"{base}/api/tasks/{run.task_ids[0]}/events?after=999999", headers=headers
                    ) as resp:
                        run.client_saw.append(f"{dict(resp.headers)!r} {await resp.text()}")
                    answer = await grpcweb(
                        http,
                        base,
                        "GetTask",
                        task_service_pb2.GetTaskRequest(id=run.task_ids[0]),
                        None,
                        headers=headers,
                    )
                    run.client_saw.append(f"{answer.message} {answer.details!r}")

            async def ended() -> bool:
                tasks = [
                    await stub.GetTask(
                        task_service_pb2.GetTaskRequest(id=i), metadata=[("authorization", good[0])]
                    )
                    for i in run.task_ids
                ]
                return all(t.task.status in TERMINAL_STATUSES for t in tasks)

            await eventually(ended, timeout=40, interval=0.2)
            for task_id in run.task_ids:
                got = await stub.GetTask(
                    task_service_pb2.GetTaskRequest(id=task_id), metadata=[("authorization", good[0])]
                )
                run.outcomes[task_id] = got.task
                run.client_saw.append(repr(got.task))
                async for response in stub.WatchTask(
                    task_service_pb2.WatchTaskRequest(id=task_id, after_sequence=1),
                    metadata=[("authorization", good[0])],
                ):
                    run.client_saw.append(repr(response.event))
                listed = await stub.ListTasks(
                    task_service_pb2.ListTasksRequest(page_size=100), metadata=[("authorization", good[0])]
                )
                run.client_saw.append(repr(listed))
        # The last events (each task's terminal one) reach the subscription too.
        await eventually(lambda: ended_on_nats >= set(run.task_ids), timeout=20)
    finally:
        await sub.unsubscribe()
        await nc.close()


async def jetstream_messages(url: str) -> list[tuple[str, bytes]]:
    """Every message still stored in every stream, headers included."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        found: list[tuple[str, bytes]] = []
        infos: list[StreamInfo] = await js.streams_info()
        for info in infos:
            state, name = info.state, info.config.name
            assert name is not None  # a stream the server lists has its name
            for seq in range(state.first_seq, state.last_seq + 1):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    msg = await js.get_msg(name, seq)
                    found.append((f"{name}#{seq}", repr(msg.headers).encode() + b" " + (msg.data or b"")))
        return found
    finally:
        await nc.close()


@pytest.mark.timeout(240)  # a whole devstack starts for it: ~15 s idle, far more on a loaded machine
async def test_canaries_appear_nowhere(run: Run) -> None:
    await exercise(run)
    outcomes = {
        t.tts.text or t.image.prompt: (
            task_pb2.TaskStatus.Name(t.status),
            task_pb2.ErrorCode.Name(t.error.code),
        )
        for t in run.outcomes.values()
    }
    # The run really used the key and really failed in the ways it meant to.
    assert outcomes["a good voice"][0] == "TASK_STATUS_COMPLETED", outcomes
    assert outcomes["a good image"][0] == "TASK_STATUS_COMPLETED", outcomes
    assert outcomes["rejected [[content]]"] == ("TASK_STATUS_FAILED", "ERROR_CODE_CONTENT_REJECTED")
    assert outcomes["provider says 401 [[auth]]"] == ("TASK_STATUS_FAILED", "ERROR_CODE_PROVIDER_AUTH")
    assert outcomes["provider 500 once [[server*1]]"][0] == "TASK_STATUS_COMPLETED"
    assert outcomes["provider 500 always [[server]]"][1] == "ERROR_CODE_PROVIDER_UNAVAILABLE"
    leaks: list[str] = []
    for proc in run.stack.history:
        for number, line in enumerate(proc.raw):
            leaks += run.leaks(f"{proc.name} log line {number}: {line[:200]}", line)
    assert sum(len(p.raw) for p in run.stack.history) > 100, "too few log lines to mean anything"
    for seen in run.client_saw:
        leaks += run.leaks(f"an answer to a client: {seen[:200]}", seen)
    for message in run.nats_seen:
        leaks += run.leaks(f"a NATS message: {message[:200]!r}", message)
    assert len(run.nats_seen) > 20
    for name in ("tasks.db", "tasks.db-wal", "tasks.db-shm"):
        path = run.stack.data_dir / name
        if path.exists():
            leaks += run.leaks(name, path.read_bytes())
    assert (run.stack.data_dir / "tasks.db").stat().st_size > 0
    stored = await jetstream_messages(run.stack.nats_url)
    assert any(name.startswith("OBJ_") for name, _ in stored), "no media objects to check"
    for where, blob in stored:
        leaks += run.leaks(f"JetStream {where}", blob)
    for directory, _, files in os.walk(run.stack.data_dir / "nats"):
        for file in files:  # the stream store on disk, for good measure
            leaks += run.leaks(f"NATS file {file}", (Path(directory) / file).read_bytes())
    assert leaks == []


# -- the internal API ------------------------------------------------------------------------


async def test_task_store_refuses_callers_without_the_internal_token(run: Run) -> None:
    addr = run.stack.task_store_addr
    request = spb.GetTaskRequest(tenant=TENANT, id="task_" + "0" * 32)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = store_service_pb2_grpc.TaskStoreServiceStub(channel)
        wrong: tuple[list[tuple[str, str]], ...] = (
            [],
            [("authorization", "Bearer wrong")],
            [("authorization", f"Bearer {run.internal_token}x")],
        )
        for metadata in wrong:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetTask(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "CHARAI_INTERNAL_TOKEN" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as claim:
                await stub.ClaimTask(
                    spb.ClaimTaskRequest(task_id="task_" + "0" * 32, worker_id="intruder"), metadata=metadata
                )
            assert claim.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Reflection of the internal API is closed too; health stays open for probes.
        # The stream is refused on its metadata, before any message: nothing is written, since a
        # write racing that refusal fails in grpc's core ("Internal error from Core") instead.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = reflection.ServerReflectionInfo()
        assert await listed.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # With the token the same call goes through (NOT_FOUND: it asked for no real task).
    async with StoreClient(addr, run.internal_token) as store:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await store.get_task(request.tenant, request.id)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        if run.task_ids:  # the gateway and the workers, which hold the token, did their work
            task = await store.get_task(TENANT, run.task_ids[0])
            assert task.status == task_pb2.TASK_STATUS_COMPLETED
