"""Operating charai: queue statistics, the dead-letter re-run, metrics and health.

Queue statistics and RetryTask are SQL in the store, so they run on both backends (a SQLite file
and a real PostgreSQL database); ``queue_position`` and the statistics are also checked across
two task_store replicas sharing one PostgreSQL database, since that is where a per-process
counter would go wrong. Metrics and health run the real services against a real nats-server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.storeclient import StoreClient
from charai.emulator import EmulatorConfig, running_emulator
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.image_worker.app import build as build_image_worker
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.backlog import FairConfig
from charai.task_store.settings import Settings
from charai.task_store.settings import Settings as StoreSettings
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from charai.worker.app import WorkerApp
from charai.worker.settings import ImageWorkerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from tests.conftest import eventually, run_cli
from tests.pg import PgServer, fresh_database

if TYPE_CHECKING:
    from tests.conftest import NatsServer
    from tests.pg import PgDatabase

IMAGE = task_pb2.TASK_TYPE_IMAGE_GENERATION
TTS = task_pb2.TASK_TYPE_TTS_GENERATION
HIGH, NORMAL, LOW = task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_LOW
#: Retries far enough out that a task scheduled for one is still waiting when the test looks.
SLOW_RETRY = RetryPolicy(base=30, cap=60, max_attempts=3)


def image_request(n: int = 0, priority: int = NORMAL) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=IMAGE,
        priority=priority,  # type: ignore[arg-type]
        image=task_pb2.ImagePayload(
            character_id=f"char_{n:03d}", prompt=f"portrait {n}", resolution="1024x1024", view_type="front"
        ),
    )


def tts_request(n: int = 0) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=TTS,
        tts=task_pb2.TtsPayload(character_id=f"char_{n:03d}", text="hello", voice_style="tongtong"),
    )


def fail_req(task_id: str, attempt: int, kind: ErrorKind) -> spb.FailTaskRequest:
    return spb.FailTaskRequest(
        task_id=task_id,
        attempt=attempt,
        error=task_pb2.TaskError(code=int(kind), message="boom"),  # type: ignore[arg-type]
    )


def complete_req(task_id: str, attempt: int) -> spb.CompleteTaskRequest:
    return spb.CompleteTaskRequest(
        task_id=task_id,
        attempt=attempt,
        image_result=task_pb2.ImageResult(image_url="charai-media:x.png", prompt="p", resolution="1024x1024"),
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    # Every job queued at create (no fair-share holding: the lanes' counts are under test).
    config = StoreConfig(max_attempts=3, retry=SLOW_RETRY, lease_seconds=5.0, fair=FairConfig(buffer=10_000))
    if request.param == "sqlite":
        async with open_store(f"sqlite:///{tmp_path / 'tasks.db'}", config) as opened:
            yield opened
        return
    server: PgServer = request.getfixturevalue("pg_server")
    async with fresh_database(server) as database, open_store(database.url, config) as opened:
        yield opened


def lane(lanes: list[task_service_pb2.LaneStats], t: int, p: int) -> task_service_pb2.LaneStats:
    (found,) = [s for s in lanes if s.type == t and s.priority == p]
    return found


# -- GetQueueStats ---------------------------------------------------------------------------
async def test_queue_stats_count_each_lane_on_a_controlled_scenario(store: TaskStore) -> None:
    """5 normal images (1 running, 1 completed, 1 waiting for a retry, 2 queued), 2 high images
    queued, 1 TTS running: every number of every lane follows, the empty lanes are listed at 0."""
    normal = [(await store.create("t1", image_request(n)))[0] for n in range(5)]
    for n in range(2):
        await store.create("t2", image_request(10 + n, HIGH))
    tts, _ = await store.create("t1", tts_request())
    claims = [await store.claim(t.id, 1, "w1") for t in normal[:3]]
    await store.claim(tts.id, 1, "w1")
    await store.complete(complete_req(normal[0].id, claims[0].attempt))
    outcome, delay, _ = await store.fail(
        fail_req(normal[1].id, claims[1].attempt, ErrorKind.PROVIDER_TIMEOUT)
    )
    assert outcome == spb.FAIL_OUTCOME_RETRY and delay > 0

    lanes, backlog = await store.queue_stats()
    assert [(s.type, s.priority) for s in lanes] == [
        (IMAGE, HIGH), (IMAGE, NORMAL), (IMAGE, LOW), (TTS, HIGH), (TTS, NORMAL), (TTS, LOW)
    ]  # fmt: skip
    image_normal = lane(lanes, IMAGE, NORMAL)
    assert (image_normal.depth, image_normal.waiting_retry, image_normal.in_flight) == (2, 1, 1)
    assert image_normal.completed_last_minute == 1
    assert image_normal.throughput_per_second == pytest.approx(1 / 60)
    # Three first starts, each a few milliseconds after its creation.
    assert image_normal.wait_samples == 3
    assert 0 < image_normal.median_wait_seconds < 5
    image_high = lane(lanes, IMAGE, HIGH)
    assert (image_high.depth, image_high.in_flight, image_high.wait_samples) == (2, 0, 0)
    tts_normal = lane(lanes, TTS, NORMAL)
    assert (tts_normal.depth, tts_normal.in_flight, tts_normal.wait_samples) == (0, 1, 1)
    assert lane(lanes, TTS, LOW) == task_service_pb2.LaneStats(type=TTS, priority=LOW)
    assert backlog == 8  # nothing relays in this test: every job is still in the outbox


# -- RetryTask -------------------------------------------------------------------------------
async def test_retry_requeues_a_failed_task_with_a_fresh_budget(store: TaskStore) -> None:
    task, _ = await store.create("t1", image_request())
    claim = await store.claim(task.id, 1, "w1")
    outcome, _, failed = await store.fail(fail_req(task.id, claim.attempt, ErrorKind.CONTENT_REJECTED))
    assert outcome == spb.FAIL_OUTCOME_FAILED and failed.status == task_pb2.TASK_STATUS_FAILED

    retried = await store.retry("t1", task.id)
    # Progress never goes back, not even on a re-run: stage and the QUEUED event show it.
    assert (retried.status, retried.stage, retried.progress) == (task_pb2.TASK_STATUS_QUEUED, "queued", 10)
    assert not retried.HasField("error") and not retried.HasField("end_time")
    assert (retried.attempt, retried.max_attempts) == (1, 4)  # history kept, budget extended by 3
    events, _ = await store.list_events(spb.ListEventsRequest(tenant="t1", task_id=task.id))
    assert events[-1].type == task_pb2.TASK_EVENT_TYPE_QUEUED
    # A new job with the next dispatch generation; the old generation's delivery is stale.
    gens = [(r.task_id, r.dispatch_gen) for r in await store.pending_dispatches()]
    assert (task.id, 2) in gens
    # The re-run gets the retry budget again: a retryable failure is retried, not final.
    claim = await store.claim(task.id, 2, "w1")
    assert (claim.outcome, claim.attempt) == (spb.CLAIM_OUTCOME_RUN, 2)
    outcome, _, _ = await store.fail(fail_req(task.id, 2, ErrorKind.PROVIDER_TIMEOUT))
    assert outcome == spb.FAIL_OUTCOME_RETRY


async def test_retry_refuses_other_tenants_and_tasks_that_did_not_fail(store: TaskStore) -> None:
    from charai.core.errors import NotFailedError, NotFoundError

    task, _ = await store.create("t1", image_request())
    with pytest.raises(NotFailedError):
        await store.retry("t1", task.id)  # queued
    claim = await store.claim(task.id, 1, "w1")
    await store.complete(complete_req(task.id, claim.attempt))
    with pytest.raises(NotFailedError):
        await store.retry("t1", task.id)  # completed
    with pytest.raises(NotFoundError):
        await store.retry("t2", task.id)
    cancelled, _ = await store.create("t1", image_request(1))
    await store.cancel("t1", cancelled.id)
    with pytest.raises(NotFailedError):
        await store.retry("t1", cancelled.id)


# -- two replicas on one PostgreSQL database -------------------------------------------------
@contextlib.asynccontextmanager
async def store_replica(nats_url: str, database_url: str, data_dir: Path) -> AsyncIterator[StoreClient]:
    settings = Settings(
        nats_url=nats_url,
        data_dir=data_dir,
        database_url=database_url,
        shutdown_grace_seconds=1.0,
        dispatch_buffer=10_000,  # every job queued at create: positions by lane, as below
    )
    app = TaskStoreApp(settings, listen_addr="127.0.0.1:0")
    async with app, StoreClient(f"127.0.0.1:{app.port}") as client:
        yield client


async def test_queue_position_and_stats_agree_across_two_postgres_replicas(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    """Tasks created alternately through two replicas: each replica reports every task's
    position in its lane counting the other replica's tasks too, and the same lane stats."""
    async with (
        store_replica(nats_server.url, postgres.url, tmp_path / "a") as a,
        store_replica(nats_server.url, postgres.url, tmp_path / "b") as b,
    ):
        created: list[task_pb2.Task] = []
        for n in range(6):
            client = a if n % 2 == 0 else b
            task = await client.create_task("t1", image_request(n))
            created.append(task)
            assert task.queue_position == n + 1
        high = await b.create_task("t2", image_request(99, HIGH))
        assert high.queue_position == 1  # high goes ahead of every normal task
        for client in (a, b):
            positions = [(await client.get_task("t1", t.id)).queue_position for t in created]
            assert positions == [2, 3, 4, 5, 6, 7]
        # A worker claims the oldest normal task through replica b: everyone behind it moves up.
        claim = await b.claim_task(created[0].id, 1, "")
        assert claim.outcome == spb.CLAIM_OUTCOME_RUN
        got = await a.get_task("t1", created[5].id)
        assert got.queue_position == 6
        stats = [await c.get_queue_stats() for c in (a, b)]
        for answer in stats:
            image_normal = lane(list(answer.lanes), IMAGE, NORMAL)
            assert (image_normal.depth, image_normal.in_flight, image_normal.wait_samples) == (5, 1, 1)
            assert lane(list(answer.lanes), IMAGE, HIGH).depth == 1
        # The same lanes from both (only the outbox backlog may differ while the relays drain it).
        assert list(stats[0].lanes) == list(stats[1].lanes)


async def test_retry_task_over_grpc_codes(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    async with store_replica(nats_server.url, postgres.url, tmp_path / "a") as client:
        created = await client.create_task("t1", image_request())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.retry_task("t1", created.id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.retry_task("t2", created.id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- the stack: metrics, health, RetryTask through the gateway -------------------------------
TOKEN_A, TOKEN_B = "ops-token-a", "ops-token-b"


@dataclasses.dataclass
class Stack:
    store: TaskStoreApp
    gateway: GatewayApp
    worker: WorkerApp
    http: aiohttp.ClientSession
    channel: grpc.aio.Channel
    stub: task_service_pb2_grpc.TaskServiceAsyncStub

    @staticmethod
    def auth(token: str = TOKEN_A) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {token}"),)

    async def create(self, prompt: str) -> task_pb2.Task:
        request = image_request()
        request.image.prompt = prompt
        response = await self.stub.CreateTask(request, metadata=self.auth(), timeout=10)
        return response.task

    async def wait_end(self, task_id: str, token: str = TOKEN_A) -> task_pb2.Task:
        async for response in self.stub.WatchTask(
            task_service_pb2.WatchTaskRequest(id=task_id), metadata=self.auth(token), timeout=30
        ):
            if response.event.task.status in (
                task_pb2.TASK_STATUS_COMPLETED,
                task_pb2.TASK_STATUS_FAILED,
                task_pb2.TASK_STATUS_CANCELLED,
            ):
                return response.event.task
        raise AssertionError("the watch ended before the task did")

    async def charai(self, *args: str) -> tuple[int, str]:
        """The ``charai`` CLI (a real subprocess) against this stack's gateway: exit code, stdout."""
        code, out, _ = await run_cli(f"127.0.0.1:{self.gateway.grpc_port}", TOKEN_A, *args)
        return code, out

    async def scrape(self, port: int) -> dict[str, float]:
        async with self.http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return parse_metrics(await resp.text())


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` → value, for every sample line."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


@pytest_asyncio.fixture
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Stack]:
    common: dict[str, Any] = {
        "nats_url": nats_server.url,
        "data_dir": tmp_path,
        "shutdown_grace_seconds": 1.0,
    }
    store_settings = StoreSettings(
        **common,
        database_url=f"sqlite:///{tmp_path / 'tasks.db'}",
        metrics_addr="127.0.0.1:0",
        retry_base_seconds=0.05,
        retry_cap_seconds=0.2,
    )
    async with (
        running_emulator(EmulatorConfig(latency_min=0, latency_max=0.01)) as emu,
        TaskStoreApp(store_settings, listen_addr="127.0.0.1:0") as store,
    ):
        gateway_settings = GatewaySettings(
            **common,
            task_store_addr=f"127.0.0.1:{store.port}",
            gateway_grpc_addr="127.0.0.1:0",
            gateway_http_addr="127.0.0.1:0",
            api_keys=SecretStr(f"{TOKEN_A}=tenant-a,{TOKEN_B}=tenant-b"),
            operator_tenants="tenant-a",
            media_signing_key="test-signing-key",
        )
        worker_settings = ImageWorkerSettings(
            **common,
            task_store_addr=f"127.0.0.1:{store.port}",
            image_api_base_url=emu.api_base,
            image_async_mode="sync",
            provider_allow_private_urls=True,
            metrics_addr="127.0.0.1:0",
        )
        async with (
            GatewayApp(gateway_settings) as gateway,
            build_image_worker(worker_settings) as worker,
            aiohttp.ClientSession() as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        ):
            yield Stack(store, gateway, worker, http, channel, task_service_pb2_grpc.TaskServiceStub(channel))


async def test_retry_task_reruns_a_failed_task_until_it_completes(stack: Stack) -> None:
    """The provider rejects the first call only ([[content*1]]): the task fails at once, is
    re-run with RetryTask, and completes; the dead-letter list shows it only while failed."""
    task = await stack.create("a knight [[content*1]]")
    failed = await stack.wait_end(task.id)
    assert failed.status == task_pb2.TASK_STATUS_FAILED
    assert failed.error.code == task_pb2.ERROR_CODE_CONTENT_REJECTED
    dead = await stack.stub.ListTasks(
        task_service_pb2.ListTasksRequest(status=task_pb2.TASK_STATUS_FAILED),
        metadata=stack.auth(),
        timeout=10,
    )
    assert [t.id for t in dead.tasks] == [task.id]

    with pytest.raises(grpc.aio.AioRpcError) as err:  # another tenant's task does not exist for it
        await stack.stub.RetryTask(
            task_service_pb2.RetryTaskRequest(id=task.id), metadata=stack.auth(TOKEN_B), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    code, out = await stack.charai("retry", task.id)  # the CLI's RetryTask
    assert (code, out.split()[:2]) == (0, [task.id, "queued"]), out
    done = await stack.wait_end(task.id)
    assert done.status == task_pb2.TASK_STATUS_COMPLETED
    assert done.attempt == 2 and not done.HasField("error")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.RetryTask(
            task_service_pb2.RetryTaskRequest(id=task.id), metadata=stack.auth(), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = await stack.charai("retry", task.id)
    assert code == 8  # any other error: FAILED_PRECONDITION
    dead = await stack.stub.ListTasks(
        task_service_pb2.ListTasksRequest(status=task_pb2.TASK_STATUS_FAILED),
        metadata=stack.auth(),
        timeout=10,
    )
    assert list(dead.tasks) == []


async def test_every_service_exposes_its_metrics(stack: Stack) -> None:
    ok = await stack.create("a knight in silver armour")
    flaky = await stack.create("a knight [[server*1]]")  # one 500, retried, then completes
    rejected = await stack.create("a knight [[content]]")  # fails for good
    ends = [await stack.wait_end(t.id) for t in (ok, flaky, rejected)]
    assert [t.status for t in ends] == [3, 3, 4]
    stats = await stack.stub.GetQueueStats(
        task_service_pb2.GetQueueStatsRequest(), metadata=stack.auth(), timeout=10
    )
    image_normal = lane(list(stats.lanes), IMAGE, NORMAL)
    # Stats span every tenant, so only operator tenants may read them.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stack.stub.GetQueueStats(
            task_service_pb2.GetQueueStatsRequest(),
            metadata=(("authorization", f"Bearer {TOKEN_B}"),),
            timeout=10,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "CHARAI_OPERATOR_TENANTS" in (denied.value.details() or "")
    assert (image_normal.depth, image_normal.in_flight, image_normal.completed_last_minute) == (0, 0, 2)
    assert image_normal.wait_samples == 3 and image_normal.median_wait_seconds > 0

    code, out = await stack.charai("--json", "stats")
    assert code == 0
    lanes = json.loads(out)["lanes"]
    assert len(lanes) == 6
    (as_json,) = [
        x for x in lanes if x["type"] == "TASK_TYPE_IMAGE_GENERATION" and x["priority"] == "PRIORITY_NORMAL"
    ]
    assert as_json["completedLastMinute"] == "2" and as_json["waitSamples"] == "3"
    code, out = await stack.charai("stats")
    assert code == 0
    lanes_text, providers_text = out.split("\n\n")  # the lanes, then the provider credentials
    header, *rows = lanes_text.splitlines()
    assert header.split()[:3] == ["TYPE", "PRIORITY", "QUEUED"] and len(rows) == 6
    credential = stack.worker.gate.base.credential if stack.worker.gate else "?"
    assert providers_text.splitlines()[1].split()[:5] == [
        "zhipu", "image_generation", "glm-image", credential, "closed"
    ]  # fmt: skip
    assert rows[1].split()[:7] == ["image_generation", "normal", "0", "0", "0", "2", "0.03"], rows

    store = await stack.scrape(stack.store.metrics_port)
    img = 'type="image_generation"'
    assert store[f"charai_tasks_created_total{{{img}}}"] == 3
    assert store[f"charai_tasks_completed_total{{{img}}}"] == 2
    assert store[f'charai_tasks_failed_total{{code="content_rejected",{img}}}'] == 1
    assert store[f'charai_task_retries_total{{reason="provider_unavailable",{img}}}'] == 1
    assert store[f'charai_task_duration_seconds_count{{outcome="completed",{img}}}'] == 2
    assert 0 < store[f'charai_task_duration_seconds_sum{{outcome="completed",{img}}}'] < 30
    # Workers' claims travel batched in Exchange calls (4 claims: 3 tasks, one retried), each
    # a message of an ExchangeStream call, counted as the Exchange call it stands for.
    assert store['charai_rpc_requests_total{code="OK",method="Exchange"}'] >= 1
    assert store['charai_exchange_commands_sum{kind="claim"}'] >= 1
    assert sum(v for k, v in store.items() if k.startswith("charai_exchange_commands_sum")) >= 4

    async def gauges_refreshed() -> bool:
        samples = await stack.scrape(stack.store.metrics_port)
        return samples.get(f'charai_queue_depth{{priority="normal",{img}}}') == 0 and (
            "charai_outbox_backlog" in samples
        )

    await eventually(gauges_refreshed, timeout=10)

    worker = await stack.scrape(stack.worker.metrics_port)
    assert worker['charai_worker_jobs_in_flight{kind="image"}'] == 0
    calls = {k: v for k, v in worker.items() if k.startswith("charai_provider_call_duration_seconds_count")}
    assert (
        calls['charai_provider_call_duration_seconds_count{kind="image",operation="request",outcome="200"}']
        >= 2
    )
    assert sum(calls.values()) >= 5  # 3 first calls, 1 retry, media downloads

    watch = stack.stub.WatchTasks(task_service_pb2.WatchTasksRequest(), metadata=stack.auth(), timeout=30)
    await watch.read()  # the first heartbeat: the stream is open
    gateway = await stack.scrape(stack.gateway.http_port)
    assert gateway["charai_watch_streams_open"] == 1
    assert gateway['charai_rpc_requests_total{code="OK",method="CreateTask"}'] == 3
    assert gateway['charai_rpc_duration_seconds_count{method="CreateTask"}'] == 3
    watch.cancel()


async def test_health_is_not_serving_while_nats_is_down(stack: Stack, nats_server: NatsServer) -> None:
    async def status(port: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return int(response.status)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    ports = (stack.store.port, stack.gateway.grpc_port)
    assert [await status(p) for p in ports] == [serving, serving]
    nats_server.stop()

    async def all_are(expected: int) -> bool:
        return [await status(p) for p in ports] == [expected, expected]

    await eventually(lambda: all_are(not_serving), timeout=15)
    nats_server.start()
    await eventually(lambda: all_are(serving), timeout=20)
