"""Push dispatch (``WorkerOffer``): a worker idle with free slots is handed a new task's claim on
its ExchangeStream, against a real nats-server, a real task_store (TaskStoreApp on SQLite, gRPC
on port 0) and real workers (the harness of ``test_runtime``). The job is still published, and
the pushed attempt settles its message as a claimed one does: acked when done, nak'ed for a retry,
redelivered (and taken over once the lease expired) when its worker is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from charai.core.domain import errors
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.postgres_backend import PostgresBackend
from charai.task_store.push import Offers, Outlet, pushed_response
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.units import Unit, UnitRunner
from charai.tasks.v1 import task_pb2
from charai.worker.app import WorkerApp
from charai.worker.provider import ProviderError
from charai.worker.settings import WorkerSettings
from structlog.testing import capture_logs

from tests.conftest import eventually
from tests.integration.test_runtime import (
    KIND,
    LOW,
    NORMAL,
    PROVIDER,
    BlockingHandler,
    FailingHandler,
    Harness,
    RecordingHandler,
    make_harness,
)
from tests.pg import PgServer, fresh_database

if TYPE_CHECKING:
    from tests.conftest import NatsServer

TTS = task_pb2.TASK_TYPE_TTS_GENERATION
EV = task_pb2.TaskEventType


@pytest.fixture(params=["sqlite", "postgres"])
async def h(
    request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[Harness]:
    """The harness on SQLite (the push is sent after the commit there too) and on PostgreSQL."""
    if request.param == "sqlite":
        async with make_harness(nats_server, tmp_path) as harness:
            yield harness
        return
    server: PgServer = request.getfixturevalue("pg_server")
    async with (
        fresh_database(server) as database,
        make_harness(nats_server, tmp_path, database_url=database.url) as harness,
    ):
        yield harness


async def offered(h: Harness, streams: int = 1) -> None:
    """Waits until ``streams`` offers with a free slot stand in task_store."""
    assert h.app.offers is not None
    offers = h.app.offers
    await eventually(lambda: offers.open == streams, timeout=10)


async def pushed_to_a_stand_in(h: Harness) -> tuple[task_pb2.Task, spb.PushedJob]:
    """A task pushed to the harness worker's id before that worker runs: a stand-in stream that
    offered in its name receives the push and closes, so the job's message reaches the worker
    first and the test hands it the push when it wants (``JobRunner._on_push``)."""
    late: list[spb.PushedJob] = []
    stand_in = StoreClient(f"127.0.0.1:{h.app.port}", coalesce=True, stream=True)
    stand_in.on_push(late.append)
    assert await stand_in.offer(h.worker_settings["worker_id"], [TTS], 1)
    await offered(h)
    created = await h.create()
    await eventually(lambda: len(late) == 1, timeout=10)
    await stand_in.close()
    return created, late[0]


async def test_an_idle_worker_is_pushed_the_job_and_settles_its_message(h: Harness) -> None:
    handler = RecordingHandler()
    await h.start_worker(handler, concurrency=2)
    await offered(h)

    created = await h.create()
    assert created.status == task_pb2.TASK_STATUS_QUEUED  # the create's answer is as created
    [ended] = await h.wait_ended([created.id])

    assert ended.status == task_pb2.TASK_STATUS_COMPLETED
    assert ended.attempt == 1
    assert handler.order == [created.id]
    assert h.app.offers is not None and h.app.offers.pushed == 1
    assert "charai_jobs_pushed_total 1.0" in h.app.metrics.render().decode()
    types = [e.type for e in await h.events(created.id)]
    assert types[:2] == [EV.TASK_EVENT_TYPE_QUEUED, EV.TASK_EVENT_TYPE_STARTED]
    assert types.count(EV.TASK_EVENT_TYPE_STARTED) == 1
    assert types[-1] == EV.TASK_EVENT_TYPE_COMPLETED
    await h.assert_drained()  # the job's message came after the push, and was acked
    await offered(h)  # the slot is offered again once the job ended


async def test_a_pushed_attempts_retry_is_its_message_nak_ed(h: Harness) -> None:
    handler = FailingHandler(ProviderError(errors.timeout(1)), on_attempts={1})
    await h.start_worker(handler, concurrency=1)
    await offered(h)

    created = await h.create()
    [ended] = await h.wait_ended([created.id])

    assert ended.status == task_pb2.TASK_STATUS_COMPLETED
    assert handler.attempts == [1, 2]
    assert h.app.offers is not None and h.app.offers.pushed == 1  # the retry came as a message
    types = [e.type for e in await h.events(created.id)]
    assert EV.TASK_EVENT_TYPE_RETRY_SCHEDULED in types
    await h.assert_drained()


async def test_a_push_lost_with_its_worker_runs_again_once_its_lease_expired(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with make_harness(nats_server, tmp_path, lease_seconds=1.0) as h:
        # A worker that offers, is pushed the job and is gone before it runs it: the stream ends
        # with the job's claim in it, the task RUNNING under a lease nobody renews.
        lost: list[spb.PushedJob] = []
        gone = StoreClient(f"127.0.0.1:{h.app.port}", coalesce=True, stream=True)
        gone.on_push(lost.append)
        assert await gone.offer("gone-worker", [TTS], 1)
        await offered(h)
        created = await h.create()
        await eventually(lambda: len(lost) == 1, timeout=10)
        assert lost[0].job.task_id == created.id
        assert lost[0].claim.outcome == spb.CLAIM_OUTCOME_RUN and lost[0].claim.attempt == 1
        assert (await h.get(created.id)).status == task_pb2.TASK_STATUS_RUNNING
        await gone.close()

        handler = RecordingHandler()
        await h.start_worker(handler, concurrency=1)
        [ended] = await h.wait_ended([created.id], timeout=30)

        assert ended.status == task_pb2.TASK_STATUS_COMPLETED
        assert ended.attempt == 2, "the job's message is claimed once the lost attempt's lease expired"
        assert ended.error.code == task_pb2.ERROR_CODE_UNSPECIFIED
        assert handler.order == [created.id]
        second = [e for e in await h.events(created.id) if e.type == EV.TASK_EVENT_TYPE_STARTED][-1]
        assert second.task.attempt == 2 and second.task.error.code == task_pb2.ERROR_CODE_WORKER_LOST
        await h.assert_drained()


async def test_a_job_that_overtakes_its_push_is_not_claimed_but_taken_over(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The job of a pushed task names the worker it was pushed to (``Job.pushed_to``). Reaching
    that worker before its push, it is not claimed (the store could decide such a claim late,
    after an outage longer than the lease, and start a second attempt beside the pushed one): it
    waits for the push, and the pushed attempt takes it over. Here the push is held back (a
    stand-in stream of the worker's id receives it) until the worker holds the job."""
    async with make_harness(nats_server, tmp_path, lease_seconds=30.0) as h:
        created, late = await pushed_to_a_stand_in(h)
        assert late.job.pushed_to == h.worker_settings["worker_id"]

        with capture_logs() as lines:
            handler = RecordingHandler()
            runner = (await h.start_worker(handler, concurrency=2)).runner
            assert runner is not None
            awaiting = "job_awaits_its_push"
            await eventually(lambda: any(line["event"] == awaiting for line in lines), timeout=10)
            runner._on_push(late)  # the push, late
            [ended] = await h.wait_ended([created.id], timeout=20)
            # Its message was settled by the pushed attempt: a claim's DEFER (the lease still
            # lives) would have sent it away for 30 s.
            await h.assert_drained(timeout=15)

        assert (ended.status, ended.attempt) == (task_pb2.TASK_STATUS_COMPLETED, 1)
        assert handler.order == [created.id]
        assert not [line for line in lines if line["event"] in ("claim_failed", "job_skipped")]
        finished = [line for line in lines if line["event"] == "job_finished"]
        assert [f["outcome"] for f in finished] == ["completed"]  # the pushed attempt, run once


async def test_a_message_waiting_for_its_push_holds_no_slot_of_the_worker(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message of a pushed attempt is taken over by that attempt, which holds the slot: the
    message holds none, even while it waits for its push. A worker of one slot holds a message
    that overtook its push (held back by a stand-in stream, as above); a second task's job comes
    meanwhile, and runs in the free slot at once. Counted as a job, the waiting message kept it
    out until its push came (bench B3 at 1,000 in flight: 54 such messages at once kept a worker
    of 1,000 slots from claiming its last jobs until a job ended, ~0.6 s later)."""
    monkeypatch.setattr("charai.worker.jobs._PUSH_WAIT", 120.0)  # it waits for as long as it takes
    async with make_harness(nats_server, tmp_path, lease_seconds=30.0) as h:
        first, late = await pushed_to_a_stand_in(h)

        with capture_logs() as lines:
            handler = BlockingHandler()
            runner = (await h.start_worker(handler, concurrency=1)).runner
            assert runner is not None
            await eventually(
                lambda: any(line["event"] == "job_awaits_its_push" for line in lines), timeout=10
            )
            second = await h.create()
            await handler.wait_started(second.id, timeout=20)
            assert runner.waiting == 0
            assert any(line["event"] == "job_awaits_its_push" for line in lines)
            assert not [line for line in lines if line["event"] == "job_finished"]  # still waiting

            runner._on_push(late)  # the push, late: its attempt takes the message over
            await handler.wait_started(first.id, timeout=20)
            handler.gate.set()
            ended = await h.wait_ended([first.id, second.id], timeout=20)
            await h.assert_drained(timeout=15)

        assert [(t.status, t.attempt) for t in ended] == [(task_pb2.TASK_STATUS_COMPLETED, 1)] * 2
        assert handler.ran == [second.id, first.id]


async def test_a_stopping_worker_withdraws_its_offer(nats_server: NatsServer, tmp_path: Path) -> None:
    async with make_harness(nats_server, tmp_path) as h:
        settings = WorkerSettings(
            nats_url=nats_server.url, task_store_addr=f"127.0.0.1:{h.app.port}", **h.worker_settings
        )
        async with WorkerApp(settings, KIND, RecordingHandler(), PROVIDER, 2):
            await offered(h)
        await offered(h, 0)
        created = await h.create()  # nobody offers: nobody is pushed the job
        await h.wait_published(1)
        assert h.app.offers is not None and h.app.offers.pushed == 0
        assert (await h.get(created.id)).status == task_pb2.TASK_STATUS_QUEUED


async def test_a_busy_worker_offers_nothing(h: Harness) -> None:
    gate = asyncio.Event()

    class Holding(RecordingHandler):
        async def run(self, ctx):  # type: ignore[no-untyped-def]
            await gate.wait()
            return await super().run(ctx)

    await h.start_worker(Holding(), concurrency=1)
    await offered(h)
    first = await h.create()
    await eventually(lambda: h.app.offers is not None and h.app.offers.pushed == 1, timeout=10)
    second = await h.create()  # the only slot is taken: this one waits in JetStream
    await h.wait_published(2)
    assert h.app.offers is not None and h.app.offers.pushed == 1
    assert (await h.get(second.id)).status == task_pb2.TASK_STATUS_QUEUED
    gate.set()
    ended = await h.wait_ended([first.id, second.id])
    assert [t.status for t in ended] == [task_pb2.TASK_STATUS_COMPLETED] * 2


async def test_a_job_waiting_in_the_worker_starts_as_soon_as_its_capacity_grows(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker its provider gate holds to 1 call at once takes 3 jobs (the call and a prefetch
    of 2), and offers them. Three LOW jobs are pushed to it; a fourth, NORMAL, comes on that lane's
    long poll (still out) and waits in the worker for a slot, unclaimed. Then a call at the limit
    succeeds and the limit grows: the fourth starts at once, not when one of the three ends (they
    never end here). The fault suite's kill tests met this after a fresh key's trial call."""
    async with make_harness(nats_server, tmp_path) as h:
        h.worker_settings["long_poll_seconds"] = 60.0  # the NORMAL lane's poll stays out
        handler = BlockingHandler()
        runner = (await h.start_worker(handler, concurrency=8)).runner
        assert runner is not None
        gate = runner.provider.gate
        gate.rejected_after_release()  # a 429 with no call in flight: one call at a time
        assert gate.limit == 1
        offers = h.app.offers
        assert offers is not None
        await eventually(lambda: offers.slots == 3, timeout=10)

        first = [await h.create(LOW) for _ in range(3)]
        for task in first:
            await handler.wait_started(task.id, timeout=10)
        await eventually(lambda: offers.slots == 0, timeout=10)
        fourth = await h.create(NORMAL)
        await eventually(lambda: runner.waiting == 1, timeout=10)
        assert (await h.get(fourth.id)).status == task_pb2.TASK_STATUS_QUEUED  # not claimed

        await gate.acquire()  # a call at the limit, answered: one more call at once
        gate.succeeded()
        gate.release()
        assert gate.limit == 2
        await handler.wait_started(fourth.id, timeout=10)
        assert runner.waiting == 0
        assert all(task.id not in handler.cancelled_at for task in first)
        handler.gate.set()
        ended = await h.wait_ended([*(t.id for t in first), fourth.id])
        assert [t.status for t in ended] == [task_pb2.TASK_STATUS_COMPLETED] * 4


# -- an offer that crossed pushes on the wire --------------------------------------------------
async def test_an_offer_that_crossed_pushes_does_not_hand_out_their_slots_again() -> None:
    """A worker counts its free slots, and task_store pushes it jobs meanwhile: the offer it sends
    counted the pushes it had received (``pushes_received``), and task_store takes off the ones
    it sent after those. Without that, the late offer stood in full beside the jobs on their way
    (a worker whose provider admits 1 call and prefetch 2 was offered again while full, and
    ``test_a_job_waiting_in_the_worker_starts_as_soon_as_its_capacity_grows`` waited in vain for
    the slots to reach 0 when its worker re-offered while the three pushes were on the wire)."""
    offers, _ = _offered(3)  # no count: an older worker's offer stands as it is
    outlet = None
    for _ in range(3):
        taken = offers.take(TTS)
        assert taken is not None
        outlet = taken[0]
    assert outlet is not None and offers.slots == 0

    def offer(slots: int, received: int | None) -> int:
        sent = spb.WorkerOffer(worker_id="w1", types=[TTS], slots=slots)
        if received is not None:
            sent.pushes_received = received
        offers.offer(outlet, sent)
        return offers.slots

    # Two free slots, counted with one push received: the other two are on their way.
    assert offer(2, 1) == 0
    assert offer(2, 3) == 2  # counted with all three in hand
    assert offer(2, None) == 2  # an older worker
    taken = offers.take(TTS)
    assert taken is not None
    offers.give_back(taken[0])  # never sent (its transaction rolled back): not on its way
    assert offer(1, 3) == 1


async def test_a_workers_offer_counts_the_pushes_its_stream_received(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """``StoreClient.offer`` stamps the offer with the pushes its stream had received when it was
    called: after two pushes, an offer of one slot stands with one slot (stamped 0, task_store
    would take the two pushes off it again and withdraw it), and the next job is pushed to it."""
    async with make_harness(nats_server, tmp_path) as h:
        offers = h.app.offers
        assert offers is not None
        stamps: list[int | None] = []  # what task_store was told, offer by offer
        record = offers.offer

        def recording(outlet: Outlet, offer: spb.WorkerOffer) -> None:
            stamps.append(offer.pushes_received if offer.HasField("pushes_received") else None)
            record(outlet, offer)

        offers.offer = recording  # type: ignore[method-assign]
        got: list[spb.PushedJob] = []
        client = StoreClient(f"127.0.0.1:{h.app.port}", coalesce=True, stream=True)
        client.on_push(got.append)
        try:
            assert await client.offer("w-count", [TTS], 2)
            await offered(h)
            first = [await h.create() for _ in range(2)]
            await eventually(lambda: len(got) == 2, timeout=10)
            assert offers.slots == 0
            assert await client.offer("w-count", [TTS], 1)
            await offered(h)
            assert offers.slots == 1
            assert stamps == [0, 2]
            third = await h.create()
            await eventually(lambda: len(got) == 3, timeout=10)
            assert [p.job.task_id for p in got] == [*(t.id for t in first), third.id]
        finally:
            await client.close()


# -- a push whose transaction does not commit gives its slot back ----------------------------
def _push_into(unit: Unit, offers: Offers) -> None:
    """What ``Commands._push`` does to a unit: a slot taken, the push recorded for the commit."""
    taken = offers.take(TTS)
    assert taken is not None
    response = pushed_response(spb.Job(task_id="task_x", dispatch_gen=1), spb.ClaimTaskResponse())
    unit.pushed.append((taken[0], response))


def _offered(slots: int) -> tuple[Offers, asyncio.Queue[object]]:
    offers, queue = Offers(30.0), asyncio.Queue[object]()
    offers.offer(
        Outlet(queue, asyncio.get_running_loop()), spb.WorkerOffer(worker_id="w1", types=[TTS], slots=slots)
    )
    return offers, queue


async def test_a_push_whose_transaction_fails_gives_its_slot_back(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "tasks.db", checkpoint_interval=-1)
    await backend.open()
    try:
        runner = UnitRunner(backend)
        offers, queue = _offered(1)
        runner.offers = offers

        async def failing(unit: Unit) -> None:
            _push_into(unit, offers)
            raise RuntimeError("the transaction fails after the push")

        with pytest.raises(RuntimeError):
            await runner.write(failing)
        assert (offers.slots, offers.pushed, queue.qsize()) == (1, 0, 0)
    finally:
        await backend.close()


async def test_a_retried_transactions_first_push_gives_its_slot_back(pg_server: PgServer) -> None:
    """PostgreSQL runs a deadlocked transaction again: the push the first run recorded was never
    sent, and its slot is the offer's again; the second run's push is sent once."""
    async with fresh_database(pg_server) as database:
        backend = PostgresBackend(database.url)
        await backend.open()
        try:
            runner = UnitRunner(backend)
            offers, queue = _offered(2)
            runner.offers = offers
            runs = 0

            async def deadlocked_once(unit: Unit) -> int:
                nonlocal runs
                runs += 1
                _push_into(unit, offers)
                if runs == 1:
                    raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
                return runs

            assert await runner.write(deadlocked_once) == 2
            assert (offers.slots, offers.pushed, queue.qsize()) == (1, 1, 1)
        finally:
            await backend.close()
