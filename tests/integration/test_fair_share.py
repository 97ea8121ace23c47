"""Fair share between tenants in task_store (held tasks, released in fair order), on both
backends, against the reference model (``charai.core.domain.fairshare.FairQueue``).

The store is driven directly (no relay: released jobs stay in the outbox, in release order),
with the store's clock moved by hand. A released task is cancelled or claimed to make room, so
each release shows exactly which tasks the store picked. The whole path through NATS, a worker
and the provider emulator is ``test_fair_share_stack.py``'s.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncpg
import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.fairshare import FairQueue
from charai.core.tenants import TenantPolicy, Tenants
from charai.task_store import placement
from charai.task_store.app import TaskStoreApp
from charai.task_store.backlog import URGENCY, FairConfig
from charai.task_store.settings import Settings
from charai.task_store.store import TaskStore
from charai.tasks.v1 import task_pb2, task_service_pb2
from structlog.testing import capture_logs

from tests.integration.conftest import Database, Recorded, opened
from tests.integration.store_requests import (
    CANCELLED,
    DEFER,
    DONE,
    IMAGE,
    QUEUED,
    RUN,
    RUNNING,
    TTS,
    complete_req,
    fail_req,
    image_request,
    tts_request,
)

S = 1_000_000
AGING_S = 30.0
WEIGHTS = Tenants(by_tenant={"big": TenantPolicy(weight=3)})
HIGH, NORMAL, LOW = task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_LOW


def fair(buffer: int = 1, tenants: Tenants = WEIGHTS) -> FairConfig:
    return FairConfig(tenants=tenants, buffer=buffer, aging_seconds=AGING_S)


async def is_held(store: TaskStore, task_id: str) -> bool:
    row = await store.backend.read(lambda tx: tx.fetchrow("SELECT held FROM tasks WHERE id = ?", task_id))
    assert row is not None
    in_backlog = await store.backend.read(
        lambda tx: tx.fetchval("SELECT COUNT(*) FROM backlog WHERE task_id = ?", task_id)
    )
    assert bool(row[0]) == bool(in_backlog), "tasks.held and the backlog row disagree"
    return bool(row[0])


async def outbox_ids(store: TaskStore) -> list[str]:
    """Task ids of the jobs in the outbox, in the order they were written (release order)."""
    return [row.task_id for row in await store.pending_dispatches(limit=10_000)]


class Driver:
    """Creates tasks in the store and in the model side by side, releases, and reads what the
    store released (new outbox rows, in order)."""

    def __init__(self, rec: Recorded, config: FairConfig) -> None:
        self.store = rec.store
        self.clock = rec.clock
        self.model: FairQueue[str] = FairQueue(config.tenants.weight, int(config.aging_seconds * S))
        self.seen = 0
        self.direct: list[str] = []

    async def create(self, tenant: str, priority: int = NORMAL, kind: int = IMAGE) -> task_pb2.Task:
        request = image_request(priority=priority) if kind == IMAGE else tts_request()
        task, created = await self.store.create(tenant, request)
        assert created
        # The place a create answers is the one a read finds right after.
        assert task.queue_position == (await self.store.get(tenant, task.id)).queue_position
        if await is_held(self.store, task.id):
            self.model.push(tenant, task.id, URGENCY[task.priority], task.create_time.ToMicroseconds())
        else:
            self.direct.append(task.id)
        return task

    async def released(self) -> list[str]:
        ids = await outbox_ids(self.store)
        new, self.seen = ids[self.seen :], len(ids)
        return new

    async def release_round(self) -> list[str]:
        """Releases what fits, checks it against the model, then cancels it (room again)."""
        count, _ = await self.store.release_held(IMAGE)
        written = await self.released()
        # A create made with room and nothing held was queued at once, not released by turn.
        got = [i for i in written if i not in self.direct]
        assert len(got) == count
        expected = []
        for _ in got:
            popped = self.model.pop()
            assert popped is not None
            expected.append(popped[1])
        assert got == expected
        for task_id in written:
            assert not await is_held(self.store, task_id)
            tenant = await self.store.tenant_of(task_id)
            assert tenant is not None
            await self.store.cancel(tenant, task_id)
        return written


@pytest.mark.parametrize("buffer", [1, 5])
async def test_tasks_are_released_in_the_fair_order_of_the_model(db: Database, buffer: int) -> None:
    """Weights (big: 3), priorities with aging, tenants arriving while others are served and a
    tenant coming back: the store releases exactly the model's order, one or five at a time."""
    config = fair(buffer)
    async with opened(db, fair=config) as rec:
        d = Driver(rec, config)
        for _ in range(buffer):  # fills the buffer: queued at once, not held
            await d.create("early")
        for i in range(12):
            await d.create("big", HIGH if i % 4 == 0 else NORMAL)
            await d.create("small", LOW if i % 3 == 0 else NORMAL)
        assert len(d.direct) == buffer and len(d.model) == 24
        assert await d.released() == d.direct
        for task_id in d.direct:  # the buffer drains: room for the held ones
            await d.store.cancel("early", task_id)
        released = await d.release_round()
        assert released
        for i in range(5):
            await d.create(f"late{i}")  # newcomers: each gets a turn among the next ones
            d.clock.advance(AGING_S / 2)  # a priority step ages in two rounds
            await d.release_round()
        comebacks = 6
        while len(d.model) or comebacks:
            if comebacks and not any(t.tenant == "small" for t in d.model.turns()):
                comebacks -= 1
                await d.create("small")  # idle for a while, then back
            assert await d.release_round()
        assert comebacks == 0
        assert await d.store.release_held(IMAGE) == (0, False)


async def test_a_newcomer_is_released_next_even_behind_a_long_backlog(db: Database) -> None:
    async with opened(db, fair=fair(buffer=2)) as rec:
        store = rec.store
        a = [(await store.create("a", image_request()))[0] for _ in range(40)]
        assert [t.queue_position for t in a[:3]] == [1, 2, 3]
        assert a[-1].queue_position == 2 + 37 + 1  # a held create answers its place in the backlog
        assert await outbox_ids(store) == [a[0].id, a[1].id]  # the buffer; 38 held
        for task in a[:2]:
            assert (await store.claim(task.id, 1, "w")).outcome == RUN
        assert await store.release_held(IMAGE) == (2, False)  # a's first two turns
        b, _ = await store.create("b", image_request())
        # Held behind the two released jobs only: its tenant's turn comes next.
        assert b.queue_position == 3
        assert (await store.get("a", a[-1].id)).queue_position == 2 + 35 + 1 + 1
        assert (await store.claim(a[2].id, 1, "w")).outcome == RUN  # room for two more
        assert await store.release_held(IMAGE) == (2, False)
        assert (await outbox_ids(store))[4:] == [b.id, a[4].id]


async def test_a_lane_without_its_row_holds_and_releases_and_gets_its_row(db: Database) -> None:
    """A task type whose lane row is missing (one the migrations did not know) is held as any
    other, its tenants join at virtual time 0, and its first release writes the lane's row."""
    async with opened(db, fair=fair(buffer=1)) as rec:
        store = rec.store
        await store.backend.write(lambda tx: tx.execute("DELETE FROM fair_lanes WHERE type = ?", IMAGE))
        first, _ = await store.create("a", image_request())
        held = [(await store.create(t, image_request()))[0] for t in ("a", "b")]
        assert not await is_held(store, first.id)
        assert [await is_held(store, t.id) for t in held] == [True, True]
        dues = await store.backend.read(
            lambda tx: tx.fetch("SELECT tenant, due FROM fair_tenants WHERE type = ? ORDER BY tenant", IMAGE)
        )
        assert [(str(r[0]), int(r[1])) for r in dues] == [("a", 0), ("b", 0)]
        assert (await store.claim(first.id, 1, "w")).outcome == RUN
        assert await store.release_held(IMAGE) == (1, False)
        lane = await store.backend.read(
            lambda tx: tx.fetchrow("SELECT vtime, turns FROM fair_lanes WHERE type = ?", IMAGE)
        )
        assert lane is not None and int(lane[1]) == 1
        assert (await outbox_ids(store))[1:] == [held[0].id]


async def test_a_claim_runs_a_waiting_tenants_first_task_instead(db: Database) -> None:
    """A worker that runs whichever task the answer carries (``any_task``) is handed the first
    task of a tenant with nothing running or released, instead of the released job it claimed,
    which goes back to the front of its tenant's backlog; its message is answered DONE from then
    on, the sweeper never takes it for a lost job, and it is released again in its turn."""
    async with opened(db, fair=fair(buffer=3)) as rec:
        store, clock = rec.store, rec.clock
        a = [(await store.create("a", image_request()))[0] for _ in range(10)]
        assert await outbox_ids(store) == [t.id for t in a[:3]]
        # Nobody waits: a claim runs its own task, also with any_task.
        first = await store.claim(a[0].id, 1, "w", any_task=True)
        assert (first.outcome, first.task and first.task.id) == (RUN, a[0].id)
        b, _ = await store.create("b", image_request())
        assert await is_held(store, b.id)
        # A worker that did not say any_task is answered about its own task.
        own = await store.claim(a[1].id, 1, "w")
        assert (own.outcome, own.task and own.task.id) == (RUN, a[1].id)
        handed = await store.claim(a[2].id, 1, "w", any_task=True)
        assert handed.outcome == RUN and handed.task is not None
        assert handed.task.id == b.id and handed.task.status == RUNNING and handed.attempt == 1
        assert not await is_held(store, b.id)
        assert await is_held(store, a[2].id)
        assert (await store.get("a", a[2].id)).status == QUEUED
        # The delivery of a[2] is stale now, also when it comes again.
        assert (await store.claim(a[2].id, 1, "w", any_task=True)).outcome == DONE
        assert (await store.claim(a[2].id, 1, "w", again=True)).outcome == DONE
        assert a[2].id not in await outbox_ids(store)
        # Long after, the sweeper suspects b once its lease ran out (its job is the message it
        # was handed with), but never the held a[2].
        clock.advance(3600)
        suspects = {task_id for task_id, _, _ in await store.stale_dispatches(0.1)}
        assert b.id in suspects and a[2].id not in suspects
        # a[2] is released again, first of its tenant's tasks; b, running now, is not handed
        # another task's claim.
        seen = len(await outbox_ids(store))
        await store.release_held(IMAGE)
        assert (await outbox_ids(store))[seen] == a[2].id
        again = await store.claim(a[2].id, 2, "w", any_task=True)
        assert (again.outcome, again.task and again.task.id) == (RUN, a[2].id)


async def test_a_claim_runs_a_waiting_tenants_released_job_instead(db: Database) -> None:
    """When the newcomer's first task was released into the buffer just before a claim (behind
    the jobs released earlier), that claim runs it: it has a turn already, so it keeps its own
    job, whose claim then finds it running (deferred)."""
    async with opened(db, fair=fair(buffer=3)) as rec:
        store = rec.store
        a = [(await store.create("a", image_request()))[0] for _ in range(10)]
        assert (await store.claim(a[0].id, 1, "w", any_task=True)).outcome == RUN
        b = [(await store.create("b", image_request()))[0] for _ in range(2)]
        assert (await store.claim(a[1].id, 1, "w")).outcome == RUN
        assert await store.release_held(IMAGE) == (2, False)  # a's turn, then b's
        assert (await outbox_ids(store))[-2:] == [a[3].id, b[0].id]
        handed = await store.claim(a[2].id, 1, "w", any_task=True)
        assert handed.outcome == RUN and handed.task is not None and handed.task.id == b[0].id
        assert await is_held(store, a[2].id) and await is_held(store, b[1].id)
        own = await store.claim(b[0].id, 1, "w2", any_task=True)
        assert own.outcome == DEFER
        # b has a task running now: a's next claim runs its own task.
        mine = await store.claim(a[3].id, 1, "w", any_task=True)
        assert mine.task is not None and mine.task.id == a[3].id


async def test_with_two_slots_first_turns_keep_the_tenants_weights(db: Database) -> None:
    """A provider that admits 2 calls (buffer 2, as the README advises): "big" (weight 3) and
    "a" (weight 1) both keep a backlog. Workers claim the released jobs in release order (as
    JetStream delivers them) with ``any_task`` and end the oldest running task before each next
    claim. A claim is handed over to a waiting tenant with nothing running only when that
    tenant's turn is due (not behind the claimed tenant's), and the claimed tenant gets back the
    turn its job's release spent; so big starts three tasks for each of a's, not one (each time
    big ran both slots, a had nothing running and took the next claim)."""
    async with opened(db, fair=fair(buffer=2)) as rec:
        store = rec.store
        for _ in range(30):
            for tenant in ("big", "a"):
                await store.create(tenant, image_request())
        consumed: set[int] = set()  # outbox rows delivered (a job released again is a new row)
        running: list[str] = []
        starts: list[str] = []

        async def start_next() -> None:
            while True:
                rows = await store.pending_dispatches(limit=10_000)
                queue = [row for row in rows if row.id not in consumed]
                assert queue, "a free slot found no released job"
                consumed.add(queue[0].id)
                claim = await store.claim(queue[0].task_id, queue[0].dispatch_gen, "w", any_task=True)
                if claim.outcome == RUN:
                    assert claim.task is not None
                    running.append(claim.task.id)
                    starts.append(await tenant_of(store, claim.task.id))
                    return

        await start_next()
        await start_next()
        for _ in range(36):
            await store.complete(complete_req(running.pop(0), 1))
            await store.release_held(IMAGE)
            await start_next()
        assert starts[0] == "big" and "a" in starts[:3], starts  # a's first turn came at once
        steady = starts[6:]
        assert steady.count("big") >= 2.5 * steady.count("a") > 0, starts


async def test_a_newcomers_released_job_is_taken_by_the_next_claim_whatever_the_turns(db: Database) -> None:
    """A newcomer's first task released just behind a job of "big" (weight 3): the turn it had
    at its release moved its ``due`` a whole weight-1 stride on, past big's, yet the next claim
    of big's job runs it (a released job had its turn: taking it reorders JetStream's line, not
    the shares). Only a held task waits until its tenant's turn is due."""
    async with opened(db, fair=fair(buffer=3)) as rec:
        store = rec.store
        big = [(await store.create("big", image_request()))[0] for _ in range(10)]
        assert (await store.claim(big[0].id, 1, "w", any_task=True)).outcome == RUN
        c = [(await store.create("c", image_request()))[0] for _ in range(3)]
        assert all([await is_held(store, t.id) for t in c])
        assert (await store.claim(big[1].id, 1, "w")).outcome == RUN
        assert await store.release_held(IMAGE) == (2, False)
        assert (await outbox_ids(store))[-3:] == [big[2].id, big[3].id, c[0].id]
        handed = await store.claim(big[2].id, 1, "w", any_task=True)
        assert handed.outcome == RUN and handed.task is not None and handed.task.id == c[0].id
        assert await is_held(store, big[2].id)


@pytest.mark.parametrize("behind_scan", [256, 1], ids=["count-behind", "count-ahead"])
async def test_queue_positions_follow_the_fair_order(
    db: Database, monkeypatch: pytest.MonkeyPatch, behind_scan: int
) -> None:
    """A held task's queue_position is its place in release order (what the model's place()
    computes, plus the released jobs ahead), and the tasks then start in that order.
    ``behind_scan=1``: a task's tenant's tasks ahead of it are counted from the front for every
    task with one behind it, not as its tenant's count less those behind (both ways checked
    against the same answers)."""
    monkeypatch.setattr(placement, "BEHIND_SCAN", behind_scan)
    config = fair(buffer=1)
    async with opened(db, fair=config) as rec:
        d = Driver(rec, config)
        await d.create("first")
        tasks = [await d.create(t) for t in ["big"] * 6 + ["x"] * 3 + ["y"] * 2]
        positions = {}
        for t in tasks:
            tenant = await tenant_of(d.store, t.id)
            positions[t.id] = (await d.store.get(tenant, t.id)).queue_position
            assert positions[t.id] == 1 + d.model.place(tenant, t.id)  # 1 released job ahead
        assert await d.released() == d.direct
        await d.store.cancel("first", d.direct[0])
        order: list[str] = []
        while len(d.model):
            order += await d.release_round()
        ties = 3 - 1  # three tenants: a place is exact up to one tie per other tenant
        for index, task_id in enumerate(order, start=2):
            assert positions[task_id] <= index <= positions[task_id] + ties, (task_id, index)


async def tenant_of(store: TaskStore, task_id: str) -> str:
    tenant = await store.tenant_of(task_id)
    assert tenant is not None
    return tenant


async def test_the_buffer_grows_to_the_tasks_running(db: Database) -> None:
    """Room = max(buffer, tasks of the type running) - released jobs not claimed; per type."""
    async with opened(db, fair=fair(buffer=2)) as rec:
        store = rec.store
        made = [(await store.create("a", image_request()))[0] for _ in range(12)]
        assert len(await outbox_ids(store)) == 2
        # A TTS task has a buffer of its own.
        tts, _ = await store.create("a", tts_request())
        assert not await is_held(store, tts.id)
        for task in made[:2]:
            await store.claim(task.id, 1, "w")
        assert await store.release_held(IMAGE) == (2, False)  # 2 running: room for 2
        for task in made[2:4]:
            await store.claim(task.id, 1, "w")
        assert await store.release_held(IMAGE) == (4, False)  # 4 running, 0 waiting: room for 4
        assert await store.release_held(IMAGE) == (0, False)
        assert await store.release_held(TTS) == (0, False)
        assert sum([await is_held(store, t.id) for t in made]) == 4


async def test_a_held_task_survives_a_restart_and_is_never_swept_as_lost(db: Database) -> None:
    async with opened(db, fair=fair(buffer=1)) as rec:
        clock = rec.clock
        released, _ = await rec.store.create("a", image_request())
        held, _ = await rec.store.create("a", image_request())
        assert await is_held(rec.store, held.id)
    async with opened(db, clock, fair=fair(buffer=1)) as rec:
        store = rec.store
        assert await is_held(store, held.id)
        assert (await store.get("a", held.id)).queue_position == 2
        # Long after, the sweeper finds neither: the released job waits in the outbox, and the
        # held task has no job anywhere (nothing was lost).
        clock.advance(3600)
        assert await store.stale_dispatches(0.1) == []
        assert await store.release_held(IMAGE) == (0, False)  # the buffer is full
        await store.cancel("a", released.id)
        assert await store.release_held(IMAGE) == (1, False)
        assert await outbox_ids(store) == [released.id, held.id]
        assert (await store.get("a", held.id)).queue_position == 1


async def test_a_cancelled_held_task_leaves_the_backlog_and_its_tenants_turns(db: Database) -> None:
    async with opened(db, fair=fair(buffer=1)) as rec:
        store = rec.store
        first, _ = await store.create("a", image_request())
        mine = [(await store.create("b", image_request()))[0] for _ in range(3)]
        other, _ = await store.create("c", image_request())
        for task in mine:
            cancelled, running = await store.cancel("b", task.id)
            assert (cancelled.status, running) == (CANCELLED, False)
            assert not await is_held(store, task.id)
        counts = await store.backend.read(
            lambda tx: tx.fetch("SELECT tenant, held FROM fair_tenants ORDER BY tenant")
        )
        assert [(str(t), int(n)) for t, n in counts] == [("b", 0), ("c", 1)]
        assert (await store.get("c", other.id)).queue_position == 2
        await store.cancel("a", first.id)
        assert await store.release_held(IMAGE) == (1, False)
        assert await outbox_ids(store) == [first.id, other.id]
        assert (await store.get("c", other.id)).status == QUEUED


async def test_a_repeated_request_id_answers_the_held_task_and_holds_nothing_more(db: Database) -> None:
    async with opened(db, fair=fair(buffer=1)) as rec:
        store = rec.store
        await store.create("a", image_request())
        keyed, created = await store.create("a", image_request(request_id="k"))
        again, created_again = await store.create("a", image_request(request_id="k"))
        assert (created, created_again, again.id, again.queue_position) == (True, False, keyed.id, 2)
        rows = await store.backend.read(lambda tx: tx.fetchval("SELECT COUNT(*) FROM backlog"))
        held = await store.backend.read(lambda tx: tx.fetchval("SELECT SUM(held) FROM fair_tenants"))
        assert (int(rows), int(held)) == (1, 1)


async def test_two_releasers_on_one_database_fill_the_room_once(db: Database) -> None:
    """Replicas release the same lane at the same moment (PostgreSQL: two stores on one
    database; SQLite: one store, releases racing on its one writer): together they release
    exactly the room, each task once, in one fair order."""
    async with opened(db, fair=fair(buffer=1)) as rec:
        clock = rec.clock
        made = [(await rec.store.create(f"t{i % 7}", image_request()))[0] for i in range(60)]
    # Restarted with a buffer of 21: 1 job released, room for 20.
    async with opened(db, clock, fair=fair(buffer=21)) as one, opened(db, clock, fair=fair(buffer=21)) as two:
        stores = [one.store] if db.kind == "sqlite" else [one.store, two.store]
        results = await asyncio.gather(*(s.release_held(IMAGE) for s in stores for _ in range(3)))
        assert sum(count for count, _ in results) == 20
        ids = await outbox_ids(one.store)
        assert len(ids) == len(set(ids)) == 21
        assert ids[0] == made[0].id
        # 7 tenants of equal weight, none served before: turns go round them in name order.
        tenants = [await tenant_of(one.store, i) for i in ids[1:]]
        assert tenants == [f"t{i % 7}" for i in range(20)]


@pytest.mark.parametrize("db", ["postgres"], indirect=True)
async def test_replicas_holding_a_tenants_images_and_voices_at_once_never_deadlock(db: Database) -> None:
    """Two stores on one PostgreSQL database (SQLite has one writer), each running units of
    creates for one tenant that hold an image and a voice line in opposite orders, four units
    at once. A hold locks the tenant's row of its type until commit, so these units deadlocked
    (6 to 9 of these 240 units ran again, and one failed after three tries: a gateway's
    UNAVAILABLE). Each unit takes its tenant's lock first now: every create is stored, and no
    unit has to run again."""
    failed: list[BaseException] = []
    async with opened(db, fair=fair(buffer=1)) as one, opened(db, one.clock, fair=fair(buffer=1)) as two:

        async def creates(store: TaskStore, voice_first: bool) -> int:
            made = 0
            for _ in range(60):
                sheet = [(image_request(), ""), (tts_request(), "")]
                lines = [(tts_request(), ""), (image_request(), "")]
                for answer in await store.create_each(
                    "t1", [lines, sheet] if voice_first else [sheet, lines]
                ):
                    if isinstance(answer, BaseException):
                        failed.append(answer)
                    else:
                        made += len(answer)
            return made

        with capture_logs() as lines:
            made = await asyncio.gather(
                *(creates(s, v) for s in (one.store, two.store) for v in (False, True))
            )
        assert failed == []
        assert sum(made) == 4 * 60 * 4
        assert [line for line in lines if line["event"] == "transaction_retried"] == []
        held = await one.store.backend.read(lambda tx: tx.fetchval("SELECT SUM(held) FROM fair_tenants"))
        rows = await one.store.backend.read(lambda tx: tx.fetchval("SELECT COUNT(*) FROM backlog"))
        assert int(held) == int(rows) == 4 * 60 * 4 - 2  # all but one of each type (buffer 1)


@pytest.mark.parametrize("db", ["postgres"], indirect=True)
async def test_a_first_turn_whose_task_is_locked_gives_way_and_the_claim_runs_its_own(db: Database) -> None:
    """PostgreSQL: the hand-over of a claim to a waiting tenant's first task locks rows out of
    the order the rest of a batch takes them in, so it waits briefly (``brief_lock_wait``) and
    gives way rather than wait into a deadlock: with that task's row locked by another
    transaction, the claim answers its own task at once (it waited until the lock's end), and the
    next claim hands the first turn over."""
    async with opened(db, fair=fair(buffer=3)) as rec:
        store = rec.store
        a = [(await store.create("a", image_request()))[0] for _ in range(6)]
        assert (await store.claim(a[0].id, 1, "w", any_task=True)).outcome == RUN
        b, _ = await store.create("b", image_request())
        assert await is_held(store, b.id)
        other = await asyncpg.connect(db.url)
        try:
            locking = other.transaction()
            await locking.start()
            await other.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", b.id)
            with capture_logs() as lines:
                own = await asyncio.wait_for(store.claim(a[1].id, 1, "w", any_task=True), 30)
            await locking.rollback()
        finally:
            await other.close()
        assert (own.outcome, own.task and own.task.id) == (RUN, a[1].id)
        assert [line["instead"] for line in lines if line["event"] == "first_turn_gave_way"] == [b.id]
        handed = await store.claim(a[2].id, 1, "w", any_task=True)
        assert handed.outcome == RUN and handed.task is not None and handed.task.id == b.id


async def test_a_bad_tenants_file_stops_start_up_with_its_message(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.toml"
    bad.write_text("[tenants.acme]\nweight = 0\n")
    settings = Settings(data_dir=tmp_path, nats_url="nats://127.0.0.1:1", tenants_file=bad)
    with pytest.raises(SystemExit) as stopped:
        await TaskStoreApp(settings, listen_addr="127.0.0.1:0").start()
    assert "CHARAI_TENANTS_FILE: tenants.acme.weight must be a whole number from 1 to 1000" in str(
        stopped.value
    )


async def test_the_buffer_covers_the_tasks_started_within_the_round(db: Database) -> None:
    """Tasks that end at once leave none running, so the running count alone kept the buffer at
    its floor: ``round_seconds`` adds the tasks started that recently (the workers' pace), and
    drops them once they are older than the round."""
    config = FairConfig(tenants=WEIGHTS, buffer=2, aging_seconds=AGING_S, round_seconds=0.05)
    async with opened(db, fair=config) as rec:
        store = rec.store
        for _ in range(3):  # six tasks started and cancelled at once: none left running
            pair = [(await store.create("a", tts_request()))[0] for _ in range(2)]
            for task in pair:
                assert not await is_held(store, task.id)
                assert (await store.claim(task.id, 1, "w")).outcome == RUN
                await store.cancel("a", task.id)

        burst = [(await store.create("a", tts_request()))[0] for _ in range(8)]
        assert [await is_held(store, t.id) for t in burst] == [False] * 6 + [True] * 2

        rec.clock.advance(0.06)  # the starts are older than the round: the floor again
        for task in burst:
            await store.cancel("a", task.id)
        later = [(await store.create("a", tts_request()))[0] for _ in range(8)]
        assert [await is_held(store, t.id) for t in later] == [False] * 2 + [True] * 6


async def test_without_a_round_the_buffer_stays_at_its_floor(db: Database) -> None:
    async with opened(db, fair=FairConfig(tenants=WEIGHTS, buffer=2, aging_seconds=AGING_S)) as rec:
        store = rec.store
        for _ in range(3):
            pair = [(await store.create("a", tts_request()))[0] for _ in range(2)]
            for task in pair:
                assert (await store.claim(task.id, 1, "w")).outcome == RUN
                await store.cancel("a", task.id)
        burst = [(await store.create("a", tts_request()))[0] for _ in range(8)]
        assert [await is_held(store, t.id) for t in burst] == [False] * 2 + [True] * 6


@pytest.mark.parametrize(
    ("behind_scan", "page_span"),
    [(256, 20_000), (1, 20_000), (256, 2)],
    ids=["count-behind", "count-ahead", "one-by-one"],
)
async def test_a_listed_page_has_the_queue_positions_each_task_reads_alone(
    db: Database, monkeypatch: pytest.MonkeyPatch, behind_scan: int, page_span: int
) -> None:
    """ListTasks places a page's queued tasks together (``placement.place_page``): each must get
    the place a GetTask of it reads (``placement.place``, one task at a time), over tenants of
    different weights, priorities, both task types, released, held, running and ended tasks,
    pages cut by size and filtered. ``behind_scan=1`` takes the count from the front;
    ``page_span=2`` places a tenant's tasks one by one when more than 2 lie between them."""
    monkeypatch.setattr(placement, "BEHIND_SCAN", behind_scan)
    monkeypatch.setattr(placement, "PAGE_SPAN", page_span)
    rng = random.Random(12)
    async with opened(db, fair=fair(buffer=2)) as rec:
        store = rec.store
        made: list[tuple[str, task_pb2.Task]] = []
        for _ in range(70):
            tenant = rng.choice(["big", "a", "a", "b", "c"])
            sheet = {"sheet": rng.choice(["s1", "s2"])}
            if rng.random() < 0.7:
                request = image_request(priority=rng.choice([HIGH, NORMAL, NORMAL, LOW]), metadata=sheet)
            else:
                request = tts_request(metadata=sheet)
            task, _ = await store.create(tenant, request)
            made.append((tenant, task))
        for tenant, task in rng.sample(made, 12):
            await store.cancel(tenant, task.id)
        claimed = await store.claim(made[0][1].id, 1, "w", any_task=True)
        assert claimed.task is not None
        checked = held = 0
        for tenant in ("big", "a", "b", "c"):
            listings = [
                task_service_pb2.ListTasksRequest(page_size=500),
                task_service_pb2.ListTasksRequest(page_size=7),
                task_service_pb2.ListTasksRequest(page_size=500, metadata={"sheet": "s2"}),
                task_service_pb2.ListTasksRequest(page_size=500, type=IMAGE, status=QUEUED),
            ]
            for listing in listings:
                while True:
                    page, token = await store.list_tasks(tenant, listing)
                    for task in page:
                        alone = await store.get(tenant, task.id)
                        assert task.queue_position == alone.queue_position, (tenant, task.id, task.status)
                        checked += 1
                        held += task.queue_position > 3
                    if not token:
                        break
                    listing.page_token = token
        assert checked > 200 and held > 30  # many pages, and many tasks deep in the backlog


@pytest.mark.parametrize("page_span", [20_000, 1], ids=["together", "one-by-one"])
async def test_a_listed_page_places_released_and_retrying_tasks_as_each_read_alone(
    db: Database, monkeypatch: pytest.MonkeyPatch, page_span: int
) -> None:
    """The released tasks of a page (jobs in the buffer, and tasks waiting for a retry, of
    every priority) are placed from one read of the released tasks' keys: each must get the
    place a GetTask of it reads. ``page_span=1``: more released tasks than that are placed one
    by one."""
    monkeypatch.setattr(placement, "PAGE_SPAN", page_span)
    rng = random.Random(5)
    async with opened(db, fair=fair(buffer=40)) as rec:
        store = rec.store
        tasks = []
        for _ in range(60):
            request = image_request(priority=rng.choice([HIGH, NORMAL, LOW]))
            tasks.append((await store.create(rng.choice(["a", "b"]), request))[0])
        released = [t for t in tasks if not await is_held(store, t.id)]
        for task in released[:15]:
            claim = await store.claim(task.id, 1, "w")
            assert claim.outcome == RUN
            await store.fail(fail_req(task.id, claim.attempt, ErrorKind.PROVIDER_TIMEOUT))
        checked = retrying = 0
        for tenant in ("a", "b"):
            page, _ = await store.list_tasks(tenant, task_service_pb2.ListTasksRequest(page_size=500))
            for task in page:
                assert task.status == QUEUED
                alone = await store.get(tenant, task.id)
                assert task.queue_position == alone.queue_position, (tenant, task.id, task.stage)
                checked += 1
                retrying += task.HasField("next_attempt_time")
        assert checked == 60 and retrying == 15 and len(released) >= 30
