"""The transactional outbox of task_store against a real nats-server: every accepted task's job
reaches the JetStream work queue exactly once, through a NATS outage, and is re-dispatched when
NATS loses it.

Each test runs on both task_store backends (``db`` from the integration conftest: a SQLite file, and a
fresh database on the private PostgreSQL server), because the outbox is written once over both
and PostgreSQL's relay claims rows with ``SKIP LOCKED`` where SQLite has one writer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.js.errors
import pytest
from charai.core import natsconn
from charai.core.clock import SYSTEM, Clock, ManualClock
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.backlog import FairConfig
from charai.task_store.dispatch import OutboxRelay
from charai.task_store.grpc_api import TaskStoreServicer
from charai.task_store.settings import Settings
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from tests.conftest import eventually
from tests.integration.conftest import Database

if TYPE_CHECKING:
    from tests.conftest import NatsServer

TOPOLOGY = Topology()
STREAM = TOPOLOGY.jobs_stream


def image_request(priority: int = task_pb2.PRIORITY_NORMAL) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        priority=priority,  # type: ignore[arg-type]
        image=task_pb2.ImagePayload(character_id="char_001", prompt="a knight", resolution="1024x1024"),
    )


def tts_request(priority: int = task_pb2.PRIORITY_NORMAL) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        priority=priority,  # type: ignore[arg-type]
        tts=task_pb2.TtsPayload(character_id="char_001", text="hello", voice_style="calm"),
    )


@dataclasses.dataclass(frozen=True)
class StoredJob:
    seq: int
    subject: str
    msg_id: str
    job: spb.Job


async def stream_messages(js: JetStreamContext) -> list[tuple[int, RawStreamMsg]]:
    """Every message in the jobs stream with its sequence, in stream order (deleted sequences
    skipped; an empty stream's sequence 0 is a bad request, not a miss, so it is not asked)."""
    state = (await js.stream_info(STREAM)).state
    if not state.messages:
        return []
    found = []
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            found.append((seq, await js.get_msg(STREAM, seq)))
        except NotFoundError:
            continue
    return found


def msg_id(msg: RawStreamMsg) -> str:
    return str((msg.headers or {}).get("Nats-Msg-Id", ""))


async def stream_jobs(js: JetStreamContext) -> list[StoredJob]:
    """Every message in the jobs stream, in stream order (deleted sequences skipped)."""
    return [
        StoredJob(seq, msg.subject or "", msg_id(msg), spb.Job.FromString(msg.data or b""))
        for seq, msg in await stream_messages(js)
    ]


async def webhook_jobs(js: JetStreamContext) -> list[tuple[int, str]]:
    """The webhook deliveries' jobs in the jobs stream: (sequence, Nats-Msg-Id), in order."""
    return [
        (seq, msg_id(msg))
        for seq, msg in await stream_messages(js)
        if msg.subject == TOPOLOGY.webhook_subject
    ]


async def stream_count(js: JetStreamContext) -> int:
    return int((await js.stream_info(STREAM)).state.messages)


@dataclasses.dataclass
class Running:
    app: TaskStoreApp
    client: StoreClient
    nc: Client
    js: JetStreamContext

    async def create(self, request: task_service_pb2.CreateTaskRequest, tenant: str = "t1") -> task_pb2.Task:
        return await self.client.create_task(tenant, request)

    async def outbox_empty(self) -> bool:
        assert self.app.store is not None
        return await self.app.store.pending_dispatches() == []


@contextlib.asynccontextmanager
async def running(
    nats_server: NatsServer, tmp_path: Path, db: Database, clock: Clock = SYSTEM, **overrides: Any
) -> AsyncIterator[Running]:
    values: dict[str, Any] = {
        "nats_url": nats_server.url,
        "data_dir": tmp_path,
        "database_url": db.url,
        "lease_seconds": 5.0,
        "retry_base_seconds": 0.05,
        "shutdown_grace_seconds": 1.0,
        # Every job released at once (these tests are about the outbox; tasks held for fair
        # share are test_fair_share.py's).
        "dispatch_buffer": 1000,
    }
    values.update(overrides)
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        async with (
            TaskStoreApp(Settings(**values), listen_addr="127.0.0.1:0", clock=clock) as app,
            StoreClient(f"127.0.0.1:{app.port}") as client,
        ):
            yield Running(app, client, nc, nc.jetstream())
    finally:
        await nc.close()


def all_published_n(r: Running, n: int) -> Any:
    async def check() -> bool:
        return await stream_count(r.js) == n and await r.outbox_empty()

    return check


async def test_created_jobs_are_published_with_msg_id_and_leave_the_outbox(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running(nats_server, tmp_path, db) as r:
        cases = [
            (image_request(), "charai.jobs.image.normal"),
            (image_request(task_pb2.PRIORITY_HIGH), "charai.jobs.image.high"),
            (tts_request(task_pb2.PRIORITY_LOW), "charai.jobs.tts.low"),
            (tts_request(task_pb2.PRIORITY_UNSPECIFIED), "charai.jobs.tts.normal"),
        ]
        tasks = [await r.create(request) for request, _ in cases]

        await eventually(all_published_n(r, len(cases)), timeout=5)
        by_task = {j.job.task_id: j for j in await stream_jobs(r.js)}
        for task, (_, subject) in zip(tasks, cases, strict=True):
            stored = by_task[task.id]
            assert stored.subject == subject
            assert stored.msg_id == f"{task.id}:1"
            assert stored.job.dispatch_gen == 1
            assert stored.job.type == task.type
            assert stored.job.priority == task.priority
        # The job carries ids only: no payload, no tenant.
        raw = await r.js.get_msg(STREAM, by_task[tasks[0].id].seq)
        assert b"a knight" not in (raw.data or b"")

        # An idempotent retry of CreateTask publishes nothing new.
        request = image_request()
        request.request_id = "req-1"
        first = await r.create(request)
        again = await r.create(request)
        assert again.id == first.id
        await eventually(all_published_n(r, len(cases) + 1), timeout=5)
        # (An empty outbox means no relay has anything left to publish: a row leaves it only
        # once JetStream acknowledged its job. So the count cannot grow later.)
        assert await stream_count(r.js) == len(cases) + 1


async def test_tasks_created_during_a_nats_outage_are_published_after_it(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running(nats_server, tmp_path, db) as r:
        warm = await r.create(image_request())
        await eventually(all_published_n(r, 1), timeout=5)

        nats_server.stop()
        created = await asyncio.wait_for(
            asyncio.gather(*(r.create(tts_request(task_pb2.PRIORITY_HIGH)) for _ in range(20))), timeout=10
        )
        assert all(t.status == task_pb2.TASK_STATUS_QUEUED for t in created)
        assert not await r.outbox_empty()  # accepted, waiting in the outbox
        nats_server.start()

        await eventually(all_published_n(r, 21), timeout=10)
        jobs = await stream_jobs(r.js)
        assert len(jobs) == 21
        assert sorted(j.msg_id for j in jobs) == sorted(f"{t.id}:1" for t in [warm, *created])
        assert len({j.job.task_id for j in jobs}) == 21
        assert all(j.subject == "charai.jobs.tts.high" for j in jobs if j.job.task_id != warm.id)


async def test_outbox_outlives_a_task_store_restart_during_the_outage(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running(nats_server, tmp_path, db) as r:
        nats_server.stop()
        created = [await r.create(image_request()) for _ in range(5)]
        assert not await r.outbox_empty()
    # task_store stopped with 5 jobs unpublished; NATS comes back, then a new task_store starts.
    nats_server.start()
    async with running(nats_server, tmp_path, db) as r:
        await eventually(all_published_n(r, 5), timeout=10)
        jobs = await stream_jobs(r.js)
        assert sorted(j.msg_id for j in jobs) == sorted(f"{t.id}:1" for t in created)


async def test_sweeper_redispatches_a_job_that_nats_lost(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # The app's own sweeper is parked (long interval); this test drives a relay's sweep by hand,
    # and the store's time.
    clock = ManualClock(tick=1e-6)
    async with running(
        nats_server, tmp_path, db, clock, redispatch_after_seconds=0.3, sweep_interval_seconds=3600
    ) as r:
        assert r.app.store is not None
        lost = await r.create(image_request())
        kept = await r.create(image_request())
        leased = await r.create(image_request())
        ended = await r.create(image_request())
        await eventually(all_published_n(r, 4), timeout=5)
        seq_of = {j.job.task_id: j.seq for j in await stream_jobs(r.js)}

        claim = await r.client.claim_task(leased.id, 1, "w")
        assert claim.outcome == spb.CLAIM_OUTCOME_RUN
        await r.client.cancel_task("t1", ended.id)
        # NATS loses three jobs: a waiting task's, a running (live lease) task's and an ended task's.
        for task in (lost, leased, ended):
            assert await r.js.delete_msg(STREAM, seq_of[task.id])

        relay = OutboxRelay(r.app.store, r.js, TOPOLOGY, redispatch_after=0.3, sweep_interval=3600)
        assert await relay.sweep_once() == 0  # published too recently to be suspect
        clock.advance(0.4)
        assert await relay.sweep_once() == 1

        async def regenerated() -> bool:
            jobs = await stream_jobs(r.js)
            return any(j.msg_id == f"{lost.id}:2" for j in jobs) and await r.outbox_empty()

        await eventually(regenerated, timeout=5)
        jobs = await stream_jobs(r.js)
        assert [(j.job.task_id, j.job.dispatch_gen, j.msg_id) for j in jobs] == [
            (kept.id, 1, f"{kept.id}:1"),
            (lost.id, 2, f"{lost.id}:2"),
        ]
        assert jobs[1].subject == "charai.jobs.image.normal"

        # Once the new job is in the stream, nothing more is re-dispatched.
        clock.advance(0.4)
        assert await relay.sweep_once() == 0
        assert await stream_count(r.js) == 2
        task = await r.client.get_task("t1", lost.id)
        assert task.status == task_pb2.TASK_STATUS_QUEUED


async def test_app_sweeper_runs_by_itself(nats_server: NatsServer, tmp_path: Path, db: Database) -> None:
    clock = ManualClock(tick=1e-6)
    async with running(
        nats_server, tmp_path, db, clock, redispatch_after_seconds=0.3, sweep_interval_seconds=0.2
    ) as r:
        relay = r.app.relay
        assert relay is not None
        lost = await r.create(tts_request())
        kept = await r.create(tts_request())
        await eventually(all_published_n(r, 2), timeout=5)
        first = {j.job.task_id: j.seq for j in await stream_jobs(r.js)}
        assert await r.js.delete_msg(STREAM, first[lost.id])

        async def sweeps_done(n: int) -> None:
            """Moves time a sweep interval at a time until the app's sweeper ran ``n`` more."""
            target = relay.sweeps + n

            async def swept() -> bool:
                if relay.sweeps < target and clock.sleepers:
                    clock.advance(0.2)
                return relay.sweeps >= target

            await eventually(swept, timeout=10)

        async def regenerated() -> bool:
            await sweeps_done(1)
            return any(j.msg_id == f"{lost.id}:2" for j in await stream_jobs(r.js))

        await eventually(regenerated, timeout=10)
        await sweeps_done(3)  # several more sweeps: nothing more is re-dispatched
        jobs = await stream_jobs(r.js)
        assert sorted(j.msg_id for j in jobs) == sorted([f"{kept.id}:1", f"{lost.id}:2"])


@contextlib.asynccontextmanager
async def bare_store(
    nats_server: NatsServer, db: Database, **config: Any
) -> AsyncIterator[tuple[TaskStore, JetStreamContext, ManualClock]]:
    """A store, the jobs stream and the store's clock, with no relay running: the test drives
    relays by hand, and moves time."""
    nc = await nats.connect(nats_server.url)
    clock = ManualClock(tick=1e-6)
    config.setdefault("fair", FairConfig(buffer=1000))  # every job released at once, as above
    store = open_store(db.url, StoreConfig(**config), clock=clock)
    try:
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, TOPOLOGY)
        async with store:
            yield store, js, clock
    finally:
        await nc.close()


def relay_on(store: TaskStore, js: JetStreamContext) -> OutboxRelay:
    return OutboxRelay(store, js, TOPOLOGY, redispatch_after=60.0, sweep_interval=3600.0)


@contextlib.asynccontextmanager
async def relay_running(store: TaskStore, js: JetStreamContext) -> AsyncIterator[OutboxRelay]:
    """A new relay, started and woken (to publish what the outbox holds), closed at the end."""
    relay = relay_on(store, js)
    relay.start()
    try:
        relay.wake()
        yield relay
    finally:
        await relay.close()


async def outbox_drained(store: TaskStore) -> None:
    """Waits until every job in the outbox is published and recorded (a relay runs)."""

    async def drained() -> bool:
        return await store.pending_dispatches() == []

    await eventually(drained, timeout=5)


async def test_a_relay_that_dies_before_recording_a_batch_is_deduplicated_by_jetstream(
    nats_server: NatsServer, db: Database
) -> None:
    """The rows a batch published are deleted by the relay's next claim. A relay that dies
    before it leaves them claimed: when the claims expire another relay publishes them again,
    JetStream drops the repeats (same Nats-Msg-Id), and that relay's last claim, which finds
    nothing more, records them."""
    async with bare_store(nats_server, db, outbox_claim_seconds=0.3) as (store, js, clock):
        tasks = [(await store.create("t1", image_request()))[0] for _ in range(3)]
        dead = relay_on(store, js)
        rows = await store.claim_dispatches(dead.owner)
        await dead._publish(rows)  # published and acknowledged; the process dies here
        assert (dead.published, dead.duplicates) == (3, 0)
        assert len(await store.pending_dispatches()) == 3  # nothing recorded yet

        clock.advance(0.31)  # the dead relay's claims expire
        async with relay_running(store, js) as survivor:
            await outbox_drained(store)
            assert (survivor.published, survivor.duplicates) == (3, 3)
        jobs = await stream_jobs(js)
        assert sorted(j.msg_id for j in jobs) == sorted(f"{t.id}:1" for t in tasks)
        clock.advance(0.01)
        stale = await store.stale_dispatches(0.0)  # every job's stream sequence was recorded
        assert sorted((task_id, seq) for task_id, _, seq in stale) == sorted(
            (j.job.task_id, j.seq) for j in jobs
        )


async def test_a_batch_records_the_jobs_jetstream_acknowledged_and_keeps_a_refused_one(
    nats_server: NatsServer, db: Database
) -> None:
    """A batch's jobs leave back to back and are acknowledged together: one refused (here, no
    stream takes its subject) fails the batch (the relay backs off and claims again), while
    the others are recorded by the next claim and the refused one stays in the outbox."""
    async with bare_store(nats_server, db) as (store, js, _clock):
        tasks = [(await store.create("t1", image_request()))[0] for _ in range(3)]
        relay = relay_on(store, js)
        rows = await store.claim_dispatches(relay.owner)
        assert sorted(r.task_id for r in rows) == sorted(t.id for t in tasks)
        refused = rows[1].task_id
        rows[1] = dataclasses.replace(rows[1], subject="charai.nowhere")
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await relay._publish(rows)
        kept = sorted(t.id for t in tasks if t.id != refused)
        assert relay.published == 2
        assert sorted(row.task_id for row, _ in relay._unmarked) == kept
        assert sorted(j.job.task_id for j in await stream_jobs(js)) == kept
        await relay._claim()  # records the two published jobs
        assert [r.task_id for r in await store.pending_dispatches()] == [refused]
        assert relay._publisher._waiting == {}  # type: ignore[attr-defined]


async def test_a_stopping_relay_records_its_last_batch_with_the_give_back(
    nats_server: NatsServer, db: Database
) -> None:
    async with bare_store(nats_server, db) as (store, js, clock):
        task, _ = await store.create("t1", image_request())
        unsent, _ = await store.create("t1", image_request())
        relay = relay_on(store, js)
        first = await store.claim_dispatches(relay.owner)
        await relay._publish(first[:1])  # the batch in hand when it is told to stop
        relay.start()
        await relay.close()  # stops before claiming again
        assert [r.task_id for r in await store.pending_dispatches()] == [unsent.id]
        # Recorded (not re-published), and the unsent row is free for another relay at once.
        assert [r.task_id for r in await store.claim_dispatches("another")] == [unsent.id]
        assert [j.msg_id for j in await stream_jobs(js)] == [f"{task.id}:1"]
        clock.advance(0.01)
        assert [(t, seq) for t, _, seq in await store.stale_dispatches(0.0)] == [(task.id, 1)]


async def test_created_jobs_are_handed_to_the_relay_and_published_once_without_a_claim(
    nats_server: NatsServer, db: Database
) -> None:
    """With a relay to hand to, a create writes its job claimed by that relay and hands it over
    after commit: published once (no duplicate from the relay's own claim running alongside),
    then recorded, under concurrent creates."""
    async with bare_store(nats_server, db) as (store, js, _clock):
        relay = relay_on(store, js)
        handed: list[str] = []

        def take(rows: list[Any]) -> None:
            handed.extend(r.task_id for r in rows)
            relay.take_threadsafe(rows)

        store.hand_off(relay.owner, take)
        task, _ = await store.create("t1", image_request())
        # Claimed for the hand-off in the create's own transaction: no claim takes it, not even
        # the relay's own (the hand-off is its only publisher).
        assert await store.claim_dispatches("another relay") == []
        assert await store.claim_dispatches(relay.owner) == []
        assert handed == [task.id]
        relay.start()
        try:
            created = await asyncio.gather(*(store.create("t1", tts_request()) for _ in range(40)))
            ids = {task.id, *(t.id for t, _ in created)}
            await outbox_drained(store)
            assert (relay.published, relay.duplicates) == (41, 0)
        finally:
            await relay.close()
        assert sorted(handed) == sorted(ids)
        assert sorted(j.job.task_id for j in await stream_jobs(js)) == sorted(ids)


class _HandsOverDuringPublish:
    """The relay's publisher, except that its first publish first creates another task (whose
    job is handed to the relay then, while the relay is busy publishing)."""

    def __init__(self, publisher: Any, create: Any) -> None:
        self._publisher = publisher
        self._create: Any = create

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        if self._create is not None:
            create, self._create = self._create, None
            await create()
        return await self._publisher.publish(*args, **kwargs)


async def test_a_job_handed_over_during_a_publish_costs_the_relay_no_extra_claim(
    nats_server: NatsServer, db: Database
) -> None:
    """A job handed to the relay while it publishes is published by its next batch, and the two
    batches are recorded by one claim; the wake-up that hand-over left behind must not cost one
    more, empty, claim afterwards (under load each is a transaction of its own)."""
    async with bare_store(nats_server, db) as (store, js, _clock):
        created: list[str] = []

        async def create() -> None:
            task, _ = await store.create("t1", tts_request())
            created.append(task.id)

        relay = OutboxRelay(store, js, TOPOLOGY, redispatch_after=60.0, sweep_interval=3600.0)
        relay._publisher = _HandsOverDuringPublish(relay._publisher, create)  # type: ignore[assignment]
        relay.poll_seconds = 3600.0  # no claim but the ones wake-ups and batches make
        claims: list[list[int]] = []  # [jobs recorded, rows claimed] of each claim, as it is made
        claim_dispatches = store.claim_dispatches

        async def counted(owner: str, limit: int = 256, sent: Any = ()) -> list[Any]:
            claim = [len(sent), -1]
            claims.append(claim)
            rows = await claim_dispatches(owner, limit, sent)
            claim[1] = len(rows)
            return rows

        store.claim_dispatches = counted  # type: ignore[method-assign]
        store.hand_off(relay.owner, relay.take_threadsafe)
        await create()  # handed to the relay, which is not running yet: it wakes it
        relay.start()
        try:
            await outbox_drained(store)
            # The relay goes on at once after a claim (no await between): an empty claim it
            # was to make after the last one has been asked for by now.
            assert claims == [[2, 0]]
            assert relay.published == 2
        finally:
            await relay.close()
        assert sorted(j.job.task_id for j in await stream_jobs(js)) == sorted(created)


async def test_creates_wake_the_relay_only_when_their_jobs_are_not_handed_to_it(
    nats_server: NatsServer, db: Database
) -> None:
    """A create whose job is handed straight to the relay (or held for fair share, whose release
    hands it over) needs no wake-up: it would only cost the relay an empty claim. A store
    without a local relay to hand to wakes it after each create call that created a task."""
    async with bare_store(nats_server, db) as (store, js, _clock):
        wakes: list[None] = []
        servicer = TaskStoreServicer(store, on_created=lambda: wakes.append(None))
        one = spb.CreateTaskRequest(tenant="t1", request=tts_request())
        batch = spb.BatchCreateTasksRequest(tenant="t1", requests=[tts_request(), image_request()])

        await servicer.CreateTask(one, None)  # type: ignore[arg-type]
        await servicer.BatchCreateTasks(batch, None)  # type: ignore[arg-type]
        assert len(wakes) == 2  # no relay to hand to: the jobs wait in the outbox

        relay = relay_on(store, js)
        store.hand_off(relay.owner, relay.take_threadsafe)
        await servicer.CreateTask(one, None)  # type: ignore[arg-type]
        await servicer.BatchCreateTasks(batch, None)  # type: ignore[arg-type]
        assert len(wakes) == 2
        relay.start()
        try:
            relay.wake()  # for the jobs that wait in the outbox
            await outbox_drained(store)
        finally:
            await relay.close()
        assert await stream_count(js) == 6


async def test_a_job_handed_to_a_relay_that_died_is_published_by_another_after_the_short_claim(
    nats_server: NatsServer, db: Database
) -> None:
    async with bare_store(nats_server, db, hand_off_claim_seconds=0.3) as (store, js, clock):
        store.hand_off("relay-that-dies", lambda rows: None)  # the process dies before publishing
        task, _ = await store.create("t1", image_request())
        assert await store.claim_dispatches("a survivor") == []  # still claimed
        clock.advance(0.31)
        async with relay_running(store, js):
            await outbox_drained(store)
        assert [j.msg_id for j in await stream_jobs(js)] == [f"{task.id}:1"]


async def test_sweeper_redispatches_a_webhook_job_that_nats_lost(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    """A delivery's job is published, its JetStream sequence recorded; NATS loses it; once the
    delivery is overdue and unclaimed, the sweep publishes it again (a new generation), and no
    more once the new one is in the stream."""
    clock = ManualClock(tick=1e-6)
    async with running(
        nats_server, tmp_path, db, clock, redispatch_after_seconds=0.3, sweep_interval_seconds=3600
    ) as r:
        assert r.app.store is not None
        request = tts_request()
        request.webhook.url = "https://hooks.example.com/charai"
        task = await r.create(request)
        await r.client.claim_task(task.id, 1, "w")
        await r.client.complete_task(task.id, 1, task_pb2.TtsResult(audio_url="charai-media:x.wav"))

        async def published(n: int) -> bool:
            return len(await webhook_jobs(r.js)) == n and await r.outbox_empty()

        await eventually(lambda: published(1), timeout=5)
        ((seq, first_id),) = await webhook_jobs(r.js)
        assert first_id.endswith(":1")
        assert await r.js.delete_msg(STREAM, seq)

        relay = OutboxRelay(r.app.store, r.js, TOPOLOGY, redispatch_after=0.3, sweep_interval=3600)
        assert await relay.sweep_once() == 0  # not overdue yet
        clock.advance(0.4)
        assert await relay.sweep_once() == 1
        await eventually(lambda: published(1), timeout=5)
        ((_, again_id),) = await webhook_jobs(r.js)
        assert again_id == first_id[:-2] + ":2"
        clock.advance(0.4)
        assert await relay.sweep_once() == 0  # the new job is there


async def test_sweeper_leaves_a_webhook_job_still_in_the_outbox_alone(
    nats_server: NatsServer, db: Database
) -> None:
    """A delivery whose job row is still in the outbox is not lost, however overdue: not
    published yet, or published by a relay that stopped before recording its sequence. The
    relays publish it (JetStream drops a repeat), and the sweep leaves it alone, as it does a
    task's job. Taken for lost, it was published again under a new generation and its receiver
    got it twice (found by tests/faults/test_webhook_crash.py after a task_store restart)."""
    async with bare_store(nats_server, db, outbox_claim_seconds=0.3) as (store, js, clock):
        request = tts_request()
        request.webhook.url = "https://hooks.example.com/charai"
        task, _ = await store.create("t1", request)
        claim = await store.claim(task.id, 1, "w")
        assert claim.outcome == spb.CLAIM_OUTCOME_RUN
        await store.complete(
            spb.CompleteTaskRequest(
                task_id=task.id,
                attempt=claim.attempt,
                tts_result=task_pb2.TtsResult(audio_url="charai-media:x"),
            )
        )
        sweeper = OutboxRelay(store, js, TOPOLOGY, redispatch_after=0.3, sweep_interval=3600)
        clock.advance(0.4)
        assert await sweeper.sweep_once() == 0  # the delivery's job waits in the outbox

        # A relay publishes both jobs (the task's, the delivery's) and stops before recording them.
        dead = relay_on(store, js)
        await dead._publish(await store.claim_dispatches(dead.owner))
        assert dead.published == 2
        clock.advance(0.4)  # its claims expire; the delivery is long overdue
        assert await sweeper.sweep_once() == 0

        async with relay_running(store, js) as survivor:
            await outbox_drained(store)
        assert survivor.duplicates == 2  # published again, dropped by JetStream
        webhook_ids = [ident for _, ident in await webhook_jobs(js)]
        assert len(webhook_ids) == 1 and webhook_ids[0].endswith(":1"), webhook_ids
        clock.advance(0.4)
        assert await sweeper.sweep_once() == 0  # recorded now, and in the stream
