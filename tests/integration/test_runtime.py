"""The worker runtime (JobRunner inside WorkerApp) against a real nats-server, a real task_store
(TaskStoreApp on a real SQLite file, gRPC on port 0) and the real media bucket.

The handlers below are the runtime's plug-in point (what an image or TTS handler would be): they
sleep, record what they ran, block, or raise. Nothing of the runtime, the store or NATS is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from charai.core.domain import errors
from charai.core.domain.errors import ErrorKind, ProviderFailure
from charai.core.storeclient import StoreClient
from charai.core.topology import LANES, Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.taskapi import TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.worker.app import WorkerApp
from charai.worker.context import Handler, JobContext
from charai.worker.http import ProviderConfig
from charai.worker.provider import ProviderError
from charai.worker.settings import WorkerSettings
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.conftest import eventually

if TYPE_CHECKING:
    from tests.conftest import NatsServer

TOPOLOGY = Topology()
KIND = "tts"
HIGH, NORMAL, LOW = task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_LOW
EV = task_pb2.TaskEventType
PROVIDER = ProviderConfig(
    base_url="http://127.0.0.1:9/v4", api_key="", model="glm-tts", key_setting="CHARAI_TTS_API_KEY"
)


def tts_request(priority: int = NORMAL, text: str = "hello") -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        priority=priority,  # type: ignore[arg-type]
        tts=task_pb2.TtsPayload(character_id="char_001", text=text, voice_style="calm"),
    )


def result_for(ctx: JobContext) -> task_pb2.TtsResult:
    return task_pb2.TtsResult(
        audio_url=f"charai-media:{ctx.task.id}.wav",
        text=ctx.task.tts.text,
        voice_style=ctx.task.tts.voice_style,
        duration_seconds=0.5,
    )


# -- handlers: the runtime's extension point -------------------------------------------------
class RecordingHandler:
    """Sleeps ``delay`` per job; records the order jobs ran in and how many ran at once."""

    kind = KIND

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.order: list[str] = []
        self.in_flight = 0
        self.peak = 0

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        self.order.append(ctx.task.id)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return result_for(ctx)


class GatedHandler:
    """Records like :class:`RecordingHandler`, but each job holds its slot until ``gate`` opens;
    with ``open_at``, the gate opens by itself once that many jobs are running at once."""

    kind = KIND

    def __init__(self, open_at: int | None = None) -> None:
        self.open_at = open_at
        self.gate = asyncio.Event()
        self.order: list[str] = []
        self.in_flight = 0
        self.peak = 0

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        self.order.append(ctx.task.id)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.open_at is not None and self.in_flight >= self.open_at:
            self.gate.set()
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return result_for(ctx)


class FailingHandler:
    """Raises ``error`` on the listed attempts and succeeds on the others."""

    kind = KIND

    def __init__(self, error: Exception, on_attempts: set[int] | None = None) -> None:
        self.error = error
        self.on_attempts = on_attempts
        self.attempts: list[int] = []

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        self.attempts.append(ctx.attempt)
        await ctx.progress(30)
        if self.on_attempts is None or ctx.attempt in self.on_attempts:
            raise self.error
        return result_for(ctx)


class BlockingHandler:
    """Blocks until ``gate`` opens; records when (and whether) it was cancelled."""

    kind = KIND

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: dict[str, asyncio.Event] = {}
        self.ran: list[str] = []
        self.cancelled_at: dict[str, float] = {}

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        self.ran.append(ctx.task.id)
        self.started.setdefault(ctx.task.id, asyncio.Event()).set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled_at[ctx.task.id] = time.monotonic()
            raise
        return result_for(ctx)

    async def wait_started(self, task_id: str, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self.started.setdefault(task_id, asyncio.Event()).wait()


# -- the harness: real task_store, real NATS, real workers -----------------------------------
@dataclasses.dataclass
class Harness:
    nats_server: NatsServer
    app: TaskStoreApp
    client: StoreClient
    nc: Client
    js: JetStreamContext
    stack: contextlib.AsyncExitStack
    worker_settings: dict[str, Any]

    async def start_worker(self, handler: Handler, concurrency: int) -> WorkerApp:
        settings = WorkerSettings(
            nats_url=self.nats_server.url,
            task_store_addr=f"127.0.0.1:{self.app.port}",
            **self.worker_settings,
        )
        return await self.stack.enter_async_context(WorkerApp(settings, KIND, handler, PROVIDER, concurrency))

    async def create(self, priority: int = NORMAL) -> task_pb2.Task:
        return await self.client.create_task("t1", tts_request(priority))

    async def create_many(self, priorities: Sequence[int]) -> list[task_pb2.Task]:
        return [await self.create(p) for p in priorities]

    async def get(self, task_id: str) -> task_pb2.Task:
        return await self.client.get_task("t1", task_id)

    async def events(self, task_id: str) -> list[task_pb2.TaskEvent]:
        response = await self.client.list_events(spb.ListEventsRequest(tenant="t1", task_id=task_id))
        return list(response.events)

    async def wait_ended(self, task_ids: list[str], timeout: float = 10.0) -> list[task_pb2.Task]:
        async def ended() -> bool:
            tasks = await asyncio.gather(*(self.get(i) for i in task_ids))
            return all(t.status in TERMINAL_STATUSES for t in tasks)

        await eventually(ended, timeout=timeout, interval=0.02)
        return list(await asyncio.gather(*(self.get(i) for i in task_ids)))

    async def stream_messages(self) -> int:
        return int((await self.js.stream_info(TOPOLOGY.jobs_stream)).state.messages)

    async def wait_published(self, count: int) -> None:
        async def published() -> bool:
            assert self.app.store is not None
            return await self.stream_messages() == count and not await self.app.store.pending_dispatches()

        await eventually(published, timeout=5)

    async def lane_backlog(self) -> dict[str, tuple[int, int]]:
        """(num_pending, num_ack_pending) of each lane consumer of the worker kind."""
        backlog = {}
        for lane in LANES:
            info = await self.js.consumer_info(TOPOLOGY.jobs_stream, TOPOLOGY.consumer(KIND, lane))
            backlog[lane] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
        return backlog

    async def assert_drained(self, timeout: float = 5.0) -> None:
        """No job left in the stream, none waiting in a lane, none delivered and unacknowledged."""

        async def drained() -> bool:
            backlog = await self.lane_backlog()
            return await self.stream_messages() == 0 and all(v == (0, 0) for v in backlog.values())

        try:
            await eventually(drained, timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"JetStream not drained: stream has {await self.stream_messages()} message(s),"
                f" lanes (pending, ack pending) = {await self.lane_backlog()}"
            ) from None


@contextlib.asynccontextmanager
async def make_harness(
    nats_server: NatsServer,
    tmp_path: Path,
    *,
    lease_seconds: float = 3.0,
    ack_wait_seconds: float = 3.0,
    **store_settings: Any,
) -> AsyncIterator[Harness]:
    settings = Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path,
        database_url=store_settings.pop("database_url", f"sqlite:///{tmp_path / 'tasks.db'}"),
        lease_seconds=lease_seconds,
        retry_base_seconds=0.05,
        retry_cap_seconds=0.5,
        shutdown_grace_seconds=1.0,
        # Every task here says the same line on purpose (the runtime is under test, not reuse):
        # each must reach the handler, so identical speech is not reused.
        reuse_ttl_seconds=0.0,
        # Every job released at once: these tests are about the runtime's lanes (tasks held for
        # fair share are test_fair_share.py's).
        dispatch_buffer=1000,
        **store_settings,
    )
    worker_settings = {
        "ack_wait_seconds": ack_wait_seconds,
        "long_poll_seconds": 1.0,
        "shutdown_grace_seconds": 2.0,
        "worker_id": "test-worker",
        # The handlers here never call a provider, so no provider gate may bound how many jobs the
        # worker takes (the shared gate admits one call until a call verifies the key).
        "provider_shared_limits": False,
    }
    async with contextlib.AsyncExitStack() as stack:
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        app = await stack.enter_async_context(TaskStoreApp(settings, listen_addr="127.0.0.1:0"))
        client = await stack.enter_async_context(StoreClient(f"127.0.0.1:{app.port}"))
        # Workers are closed first (the stack unwinds in reverse), then the store, then NATS.
        async with contextlib.AsyncExitStack() as workers:
            yield Harness(nats_server, app, client, nc, nc.jetstream(), workers, worker_settings)


@pytest.fixture
async def h(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Harness]:
    async with make_harness(nats_server, tmp_path) as harness:
        yield harness


def inversions(priorities: Sequence[int]) -> int:
    """Pairs that ran lower priority first."""
    return sum(1 for i, a in enumerate(priorities) for b in priorities[i + 1 :] if a < b)


# -- priority ----------------------------------------------------------------------------------
async def test_high_priority_runs_before_normal_before_low(h: Harness) -> None:
    tasks = await h.create_many([LOW] * 5 + [NORMAL] * 5 + [HIGH] * 5)
    await h.wait_published(15)
    priority_of = {t.id: t.priority for t in tasks}

    handler = RecordingHandler(delay=0.01)
    await h.start_worker(handler, concurrency=1)
    ended = await h.wait_ended([t.id for t in tasks])
    assert all(t.status == task_pb2.TASK_STATUS_COMPLETED for t in ended)

    ran = [priority_of[i] for i in handler.order]
    names = "".join(task_pb2.Priority.Name(p)[9] for p in ran)  # e.g. HHHHHNNLNN...
    assert len(ran) == 15, names
    assert handler.peak == 1
    assert ran[0] == HIGH, f"the high lane must go first: {names}"
    last_high = max(i for i, p in enumerate(ran) if p == HIGH)
    first_low = min(i for i, p in enumerate(ran) if p == LOW)
    assert last_high < first_low, f"a LOW task ran before a HIGH one: {names}"
    # Mostly high → normal → low; the anti-starvation turn may let a LOW pass a few NORMALs.
    assert inversions(ran) <= 8, f"order is far from high→normal→low: {names}"
    await h.assert_drained()


async def test_a_stream_of_high_tasks_does_not_starve_low(h: Harness) -> None:
    tasks = await h.create_many([HIGH] * 30 + [LOW] * 3)
    await h.wait_published(33)
    priority_of = {t.id: t.priority for t in tasks}

    handler = RecordingHandler()
    await h.start_worker(handler, concurrency=1)
    await h.wait_ended([t.id for t in tasks], timeout=20)
    ran = [priority_of[i] for i in handler.order]
    names = "".join(task_pb2.Priority.Name(p)[9] for p in ran)
    assert len(ran) == 33, names
    last_high = max(i for i, p in enumerate(ran) if p == HIGH)
    first_low = min(i for i, p in enumerate(ran) if p == LOW)
    assert first_low < last_high, f"LOW waited for every HIGH task: {names}"
    await h.assert_drained()


# -- concurrency -------------------------------------------------------------------------------
async def test_fifty_jobs_run_concurrently(h: Harness) -> None:
    """Every job holds its slot until all 50 run at once: they can only complete if the worker
    runs 50 jobs concurrently (one at a time, or in smaller waves, they would never finish)."""
    tasks = await asyncio.gather(*(h.create() for _ in range(50)))
    await h.wait_published(50)
    handler = GatedHandler(open_at=50)
    await h.start_worker(handler, concurrency=50)
    ended = await h.wait_ended([t.id for t in tasks], timeout=30)
    assert all(t.status == task_pb2.TASK_STATUS_COMPLETED for t in ended)
    assert sorted(handler.order) == sorted(t.id for t in tasks)  # each ran exactly once
    assert handler.peak == 50, f"{handler.peak} jobs ran at once with concurrency 50"
    await h.assert_drained()


async def test_concurrency_bounds_jobs_in_flight(h: Harness) -> None:
    tasks = await asyncio.gather(*(h.create(p) for p in [HIGH, NORMAL, LOW] * 8))
    await h.wait_published(24)
    handler = GatedHandler()
    worker = await h.start_worker(handler, concurrency=6)
    peak_runner = 0

    async def sample() -> None:
        nonlocal peak_runner
        while True:
            assert worker.runner is not None
            peak_runner = max(peak_runner, worker.runner.in_flight)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        # Six jobs hold their slots: the worker is full, the other 18 jobs wait in their lanes.
        await eventually(lambda: handler.in_flight == 6, timeout=15)
        backlog = await h.lane_backlog()
        assert sum(pending + ack_pending for pending, ack_pending in backlog.values()) >= 18, backlog
        assert (handler.in_flight, len(handler.order)) == (6, 6)
        handler.gate.set()
        await h.wait_ended([t.id for t in tasks], timeout=15)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert handler.peak == 6, f"peak {handler.peak} with concurrency 6"
    assert peak_runner <= 6
    assert len(handler.order) == 24
    await h.assert_drained()


# -- failures and retries ----------------------------------------------------------------------
async def test_retryable_failure_then_success(h: Harness) -> None:
    handler = FailingHandler(ProviderError(errors.timeout(1)), on_attempts={1})
    await h.start_worker(handler, concurrency=4)
    task = await h.create()
    (done,) = await h.wait_ended([task.id])
    assert done.status == task_pb2.TASK_STATUS_COMPLETED
    assert done.attempt == 2
    assert done.progress == 100
    assert done.tts_result.audio_url == f"charai-media:{task.id}.wav"
    assert handler.attempts == [1, 2]

    events = await h.events(task.id)
    types = [e.type for e in events if e.type != EV.TASK_EVENT_TYPE_PROGRESS]
    assert types == [
        EV.TASK_EVENT_TYPE_QUEUED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_COMPLETED,
    ]
    retry = next(e for e in events if e.type == EV.TASK_EVENT_TYPE_RETRY_SCHEDULED)
    assert retry.task.attempt == 1
    assert retry.task.error.code == task_pb2.ERROR_CODE_PROVIDER_TIMEOUT
    assert retry.task.error.retryable
    assert retry.task.HasField("next_attempt_time")
    await h.assert_drained()


async def test_non_retryable_failure_fails_at_once_and_removes_the_job(h: Harness) -> None:
    failure = ProviderFailure(ErrorKind.CONTENT_REJECTED, "the prompt was rejected", 400, "1301")
    handler = FailingHandler(ProviderError(failure))
    await h.start_worker(handler, concurrency=4)
    task = await h.create()
    (failed,) = await h.wait_ended([task.id])
    assert failed.status == task_pb2.TASK_STATUS_FAILED
    assert failed.attempt == 1
    assert failed.error.code == task_pb2.ERROR_CODE_CONTENT_REJECTED
    assert failed.error.message == "the prompt was rejected"
    assert (failed.error.provider_status, failed.error.provider_code) == (400, "1301")
    assert not failed.error.retryable
    # Nothing can deliver the job again: no message left in the stream, none pending or
    # unacknowledged in a lane, and no dispatch waiting in the store's outbox.
    await h.assert_drained()
    assert h.app.store is not None and not await h.app.store.pending_dispatches()
    assert handler.attempts == [1]
    types = [e.type for e in await h.events(task.id)]
    assert EV.TASK_EVENT_TYPE_RETRY_SCHEDULED not in types
    assert types[-1] == EV.TASK_EVENT_TYPE_FAILED


async def test_handler_crash_is_internal_retried_once_then_failed(h: Harness) -> None:
    handler = FailingHandler(RuntimeError("bug in the handler"))
    await h.start_worker(handler, concurrency=4)
    task = await h.create()
    (failed,) = await h.wait_ended([task.id])
    assert failed.status == task_pb2.TASK_STATUS_FAILED
    assert failed.error.code == task_pb2.ERROR_CODE_INTERNAL
    assert "RuntimeError" in failed.error.message
    assert "bug in the handler" not in failed.error.message  # internals stay in the worker's log
    assert failed.attempt == 2
    assert handler.attempts == [1, 2]
    types = [e.type for e in await h.events(task.id)]
    assert types.count(EV.TASK_EVENT_TYPE_RETRY_SCHEDULED) == 1
    assert types.count(EV.TASK_EVENT_TYPE_STARTED) == 2
    assert types[-1] == EV.TASK_EVENT_TYPE_FAILED
    await h.assert_drained()


# -- cancel --------------------------------------------------------------------------------------
async def test_cancel_aborts_the_running_handler(h: Harness) -> None:
    handler = BlockingHandler()
    await h.start_worker(handler, concurrency=1)
    running = await h.create()
    await handler.wait_started(running.id)
    assert (await h.get(running.id)).status == task_pb2.TASK_STATUS_RUNNING
    waiting = await h.create()  # stays queued behind the running one (concurrency 1)

    cancelled = await h.client.cancel_task("t1", running.id)
    assert cancelled.status == task_pb2.TASK_STATUS_CANCELLED
    # The gate is still shut: only the cancel notice can end the handler's wait.
    await eventually(lambda: running.id in handler.cancelled_at)
    assert not handler.gate.is_set()
    # The slot is free again: the next job runs (and finishes once the gate opens).
    await handler.wait_started(waiting.id)
    cancelled_queued = await h.create()
    await h.client.cancel_task("t1", cancelled_queued.id)
    handler.gate.set()

    after = {t.id: t for t in await h.wait_ended([running.id, waiting.id, cancelled_queued.id])}
    assert after[running.id].status == task_pb2.TASK_STATUS_CANCELLED
    assert after[waiting.id].status == task_pb2.TASK_STATUS_COMPLETED
    assert after[cancelled_queued.id].status == task_pb2.TASK_STATUS_CANCELLED
    await h.assert_drained()
    assert cancelled_queued.id not in handler.ran  # its job was acknowledged without running
    events = await h.events(running.id)
    assert events[-1].type == EV.TASK_EVENT_TYPE_CANCELLED
    assert [e.type for e in events].count(EV.TASK_EVENT_TYPE_CANCELLED) == 1


# -- heartbeats ------------------------------------------------------------------------------------
async def test_long_job_outlives_ack_wait_and_lease_without_redelivery(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with make_harness(nats_server, tmp_path, lease_seconds=1.0, ack_wait_seconds=1.0) as h:
        handler = RecordingHandler(delay=2.5)
        await h.start_worker(handler, concurrency=2)
        task = await h.create()
        (done,) = await h.wait_ended([task.id])
        assert done.status == task_pb2.TASK_STATUS_COMPLETED
        assert done.attempt == 1, "the lease lapsed although the worker was heartbeating"
        assert handler.order == [task.id]
        await h.assert_drained()


# -- progress reports ------------------------------------------------------------------------------
class SteppingHandler:
    """Reports ``steps`` (percent, stage, pause after) and succeeds; a refusal is seen as the
    handler's cancellation (JobAbortedError or CancelledError), recorded in ``aborted``."""

    kind = KIND

    def __init__(self, steps: list[tuple[int, str, float]], gate: asyncio.Event | None = None) -> None:
        self.steps = steps
        self.aborted = False
        #: Waited for after the first step (a test moves on once the store has that report).
        self.gate = gate

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        try:
            for n, (percent, stage, pause) in enumerate(self.steps):
                await ctx.progress(percent, stage)
                await asyncio.sleep(pause)
                if n == 0 and self.gate is not None:
                    await self.gate.wait()
        except BaseException:
            self.aborted = True
            raise
        return result_for(ctx)


def progress_seen(events: list[task_pb2.TaskEvent]) -> list[tuple[int, str]]:
    return [(e.task.progress, e.task.stage) for e in events if e.type == EV.TASK_EVENT_TYPE_PROGRESS]


async def test_reports_superseded_within_the_window_are_coalesced_but_every_stage_is_recorded(
    h: Harness,
) -> None:
    # A call that answers at once: 20, 40, 60 "generating" and 90 "processing" within a few ms.
    handler = SteppingHandler(
        [(20, "generating", 0), (40, "generating", 0), (60, "generating", 0), (90, "processing", 0)]
    )
    await h.start_worker(handler, concurrency=1)
    task = await h.create()
    (done,) = await h.wait_ended([task.id])
    assert done.status == task_pb2.TASK_STATUS_COMPLETED
    # The ticks within "generating" gave way to the next stage; "processing" was still recorded
    # before the result (never after it).
    assert progress_seen(await h.events(task.id)) == [(90, "processing")]


async def test_reports_spaced_wider_than_the_window_all_reach_the_store(h: Harness) -> None:
    handler = SteppingHandler([(20, "generating", 0.2), (50, "generating", 0.2), (90, "processing", 0.2)])
    await h.start_worker(handler, concurrency=1)
    task = await h.create()
    await h.wait_ended([task.id])
    assert progress_seen(await h.events(task.id)) == [
        (20, "generating"),
        (50, "generating"),
        (90, "processing"),
    ]


async def test_store_calls_in_flight_are_bounded_and_every_job_still_completes(h: Harness) -> None:
    # 30 jobs at once, each with a claim, a report and a completion, through 2 store-call slots.
    h.worker_settings["store_calls_in_flight"] = 2
    h.worker_settings["progress_coalesce_seconds"] = 0
    # Each job's next step waits until every first report is stored: a report still waiting
    # for a slot when its job moved on is sent with the newer state (best effort, by design), so
    # a fixed pause made the first-report check below depend on the machine's speed.
    gate = asyncio.Event()
    handler = SteppingHandler([(20, "generating", 0), (90, "processing", 0)], gate=gate)
    app = await h.start_worker(handler, concurrency=30)
    tasks = [await h.create() for _ in range(30)]

    async def all_reported() -> bool:
        return all([progress_seen(await h.events(t.id)) for t in tasks])

    await eventually(all_reported, timeout=60)
    gate.set()
    done = await h.wait_ended([t.id for t in tasks], timeout=20)
    assert {t.status for t in done} == {task_pb2.TASK_STATUS_COMPLETED}
    assert app.runner is not None
    assert app.runner.store_calls_peak == 2
    assert app.runner.store_calls == 0
    firsts = [progress_seen(await h.events(t.id))[0] for t in tasks]
    assert firsts == [(20, "generating")] * len(tasks)
    await h.assert_drained()
