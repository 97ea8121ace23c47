"""Fair share between tenants: queued tasks wait here (*held*) and are released to the workers
in fair order, a short buffer at a time.

Why: JetStream delivers a lane in order, so once a tenant's 1,000 jobs are published, another
tenant's 5 wait behind all of them. So task_store keeps the backlog itself and publishes
(through the outbox) only as many jobs per task type as the workers will take soon: the
*buffer* of released jobs not claimed yet is kept at ``max(CHARAI_DISPATCH_BUFFER, tasks of that
type running now, tasks of that type started in the last CHARAI_DISPATCH_ROUND_MS)`` (one more
round of whatever the workers run at once, or take in one round trip when tasks end at once: a
reused result leaves none running). Each claim or end
makes room, and the :class:`~charai.task_store.release.Releaser` fills it with the next held
tasks in the order of :mod:`charai.core.domain.fairshare` (weighted turns between tenants,
priority with aging within one). A job released by a tenant's turn reaches a worker after at most
one buffer's worth of other jobs: about one round of the provider's slots. A tenant that waits
for its turn with none running does not wait for the buffer: the next claim of its task type
runs its next task instead (:meth:`Backlog.first_turn`), when its turn is due.

What is stored (schema migration 7): a held task has ``tasks.held = 1`` and a ``backlog`` row
(what its job needs, and its rank within its tenant); each tenant's turn per task type is a
``fair_tenants`` row, each type's virtual time and turn count a ``fair_lanes`` row. All of it is
in the database: a held task survives restarts, replicas share one order, and the sweeper never
sees a held task as a lost job (it was never dispatched: ``dispatched_at`` is unset).

Cost: a create counts the buffer (a partial index holding only the buffer) and, when it must
hold, writes its backlog row and bumps its tenant's counter; a release reads the next tenants
from one ordered index (``budget`` rows, however many tenants wait), their next tasks, and moves
them to the outbox. Nothing scans the backlog or the tenants.

With room in the buffer and nothing held, a create releases its own job at once (handed to the
local relay, as before): an idle system pays one count per create. A re-run (RetryTask) and a
re-dispatch of a lost job go to the outbox directly: they were released once already.

A queued task's place in this order (``queue_position``) is read by
:mod:`charai.task_store.placement`.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Callable

from charai.core.clock import SYSTEM, Clock
from charai.core.domain import fairshare
from charai.core.domain.fairshare import Turn
from charai.core.domain.states import Status
from charai.core.tenants import Tenants
from charai.core.timestamps import micros
from charai.task_store.backend import Backend, Tx
from charai.task_store.outbox import Job, Outbox
from charai.task_store.units import Unit
from charai.tasks.v1 import task_pb2

#: Priority → urgency (steps below the highest) for :func:`fairshare.rank`.
URGENCY: dict[int, int] = {
    task_pb2.PRIORITY_HIGH: 0,
    task_pb2.PRIORITY_NORMAL: 1,
    task_pb2.PRIORITY_UNSPECIFIED: 1,
    task_pb2.PRIORITY_LOW: 2,
}
#: First half of the PostgreSQL transaction lock a unit of creates takes on its tenant first
#: ("chrF"); the second half is 32 bits of the tenant's name (see :meth:`Backlog._lock_tenant`).
FAIR_LOCK_CLASS = 0x63687246
#: Counts of the buffer and of running tasks stop here (the buffer is never larger).
MAX_BUFFER = fairshare.MAX_BUFFER
#: A claim looks for a tenant waiting for its first turn among this many tenants holding tasks,
#: the first in turn order (see :meth:`Backlog.first_turn`).
FIRST_TURN_SCAN = 64
_QUEUED, _RUNNING = int(Status.QUEUED), int(Status.RUNNING)
#: The released jobs nobody claimed yet (the condition of the partial index ``tasks_buffer``,
#: spelled with the same literals so the planner uses it).
_BUFFER = f"status = {_QUEUED} AND held = 0 AND next_attempt_time IS NULL"


@dataclasses.dataclass(frozen=True, slots=True)
class FairConfig:
    """Fair-share settings (task_store: ``CHARAI_TENANTS_FILE``, ``CHARAI_DISPATCH_BUFFER``,
    ``CHARAI_PRIORITY_AGING_SECONDS``)."""

    #: Tenants' weights.
    tenants: Tenants = dataclasses.field(default_factory=Tenants)
    #: Released jobs not claimed yet, per task type, at least (more while more tasks run).
    buffer: int = 4
    #: A task's priority step is worth this much waiting within its tenant.
    aging_seconds: float = 60.0
    #: Tasks released per transaction at most.
    batch: int = 256
    #: The buffer also covers the tasks of the type started in this many seconds (0: not): one
    #: round of release, publish, delivery and claim at the pace the workers take jobs. Tasks
    #: that end at once (a reused result, a quick provider) leave few running, so the running
    #: count alone kept the buffer at its floor and the lane at that many jobs per round.
    round_seconds: float = 0.0


class Backlog:
    """The held tasks, their fair order and their release into the outbox."""

    def __init__(
        self,
        backend: Backend,
        outbox: Outbox,
        config: FairConfig,
        clock: Clock = SYSTEM,
        started_within: Callable[[int, float, float], int] | None = None,
    ) -> None:
        self._lock = backend.dialect.for_update
        self._key_lock = backend.dialect.key_lock
        self._outbox = outbox
        self._config = config
        self._aging_us = int(config.aging_seconds * 1e6)
        self._clock = clock
        #: Tasks of a type started lately (``EtaBook.started_within``), for ``round_seconds``.
        self._started_within = started_within

    def weight(self, tenant: str) -> int:
        return self._config.tenants.weight(tenant)

    def _target(self, running: int, kind: int) -> int:
        """The buffer of type ``kind``: at least ``buffer``, one round of the workers (the tasks
        running), and the tasks started within ``round_seconds``."""
        target = max(self._config.buffer, running)
        if self._config.round_seconds > 0 and self._started_within is not None:
            now = self._clock.now_us() / 1e6
            target = max(target, self._started_within(kind, now, self._config.round_seconds))
        return min(MAX_BUFFER, target)

    async def measure(self, tx: Tx, kind: int) -> tuple[int, int, bool]:
        """(tasks of type ``kind`` running, released jobs not claimed yet, whether any is held)."""
        row = await tx.fetchrow(
            "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE type = ?"
            f" AND status = {_RUNNING} LIMIT ?) AS r),"
            f" (SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE type = ? AND {_BUFFER} LIMIT ?) AS b),"
            " (SELECT COUNT(*) FROM (SELECT 1 FROM fair_tenants WHERE type = ? AND held > 0 LIMIT 1) AS h)",
            kind,
            MAX_BUFFER,
            kind,
            MAX_BUFFER,
            kind,
        )
        assert row is not None
        return int(row[0]), int(row[1]), bool(row[2])

    # -- creates -------------------------------------------------------------------------------
    async def holds(self, unit: Unit, tenant: str, kind: int) -> bool:
        """Whether a new task of type ``kind`` is to be held: the buffer has no room, or another
        task of its type is held. Asked before the task's row is inserted, so a held task is
        inserted held (no second write of its row); :meth:`admit` then holds it or spends its
        place. A batch of creates measures once.

        A unit's first create of a tenant takes the tenant's transaction lock first (PostgreSQL,
        :meth:`_lock_tenant`)."""
        if self._key_lock is not None and tenant not in unit.fair_locked:
            await self._lock_tenant(unit, tenant)
        room = unit.room.get(kind)
        if room is None:
            running, released, held = await self.measure(unit.tx, kind)
            room = unit.room[kind] = 0 if held else self._target(running, kind) - released
        return room <= 0

    async def _lock_tenant(self, unit: Unit, tenant: str) -> None:
        """Takes ``tenant``'s transaction lock, held until commit: creates of one tenant run
        one unit at a time (PostgreSQL; SQLite's one writer does so anyway).

        Why: a hold locks the tenant's ``fair_tenants`` row of the task's type until commit, and
        the creates of one unit may hold tasks of several types in any order (a character's
        images and its voice line), so two replicas (or two units of one) creating for the same
        tenant locked its image and voice rows in opposite orders and deadlocked. PostgreSQL
        broke each deadlock after its ``deadlock_timeout`` (1 s), the unit ran again, and after
        three such tries the creates failed: a gateway answered UNAVAILABLE (seen in
        tests/e2e/test_replicas.py). Taken at the unit's first create, before the unit holds any
        row or writes any event (whose lock, held until commit, a unit of several batches takes
        after its first batch: :meth:`UnitRunner.write_each`), so every unit takes the two in one
        order. Units of different tenants do not wait for each other here."""
        assert self._key_lock is not None
        half = zlib.crc32(tenant.encode()) - (1 << 31)  # 32 bits of the name, a signed int4
        await unit.tx.execute(self._key_lock, FAIR_LOCK_CLASS, half)
        unit.fair_locked.add(tenant)

    async def admit(self, unit: Unit, tenant: str, job: Job, created_us: int, *, held: bool) -> None:
        """The new task's row is inserted (``held``, as :meth:`holds` answered): holds its job,
        or takes its place in the buffer (the caller queues the job at once)."""
        if held:
            unit.room[job.type] = 0
            await self._hold(unit.tx, tenant, job, created_us, mark_row=False)
        else:
            unit.room[job.type] -= 1

    async def _hold(self, tx: Tx, tenant: str, job: Job, created_us: int, *, mark_row: bool = True) -> None:
        """``job`` joins the backlog; ``mark_row``: its task row is set held (a create inserts
        it held already)."""
        rank = fairshare.rank(URGENCY.get(job.priority, 1), created_us, self._aging_us)
        if mark_row:
            await tx.execute("UPDATE tasks SET held = 1 WHERE id = ?", job.task_id)
        await tx.execute(
            "INSERT INTO backlog (task_id, type, tenant, rank, priority, dispatch_gen, traceparent)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            job.task_id,
            job.type,
            tenant,
            rank,
            job.priority,
            job.dispatch_gen,
            job.traceparent,
        )
        # fairshare.joined, in one statement so concurrent creates of one tenant cannot lose a
        # count: a tenant that held nothing joins at the lane's virtual time or later (0 for a
        # lane without its row yet: its first release writes it).
        await tx.execute(
            "INSERT INTO fair_tenants (type, tenant, due, served, held, stride)"
            " VALUES (?, ?, COALESCE((SELECT vtime FROM fair_lanes WHERE type = ?), 0), 0, 1, ?)"
            " ON CONFLICT (type, tenant) DO UPDATE SET"
            " due = CASE WHEN fair_tenants.held <= 0 AND fair_tenants.due < excluded.due"
            " THEN excluded.due ELSE fair_tenants.due END,"
            " held = CASE WHEN fair_tenants.held < 0 THEN 1 ELSE fair_tenants.held + 1 END,"
            " stride = excluded.stride",
            job.type,
            tenant,
            job.type,
            fairshare.stride(self.weight(tenant)),
        )

    async def drop(self, tx: Tx, task_id: str) -> None:
        """A held task ended without running (cancelled): out of the backlog and its tenant's count."""
        row = await tx.fetchrow("DELETE FROM backlog WHERE task_id = ? RETURNING type, tenant", task_id)
        if row is not None:
            await tx.execute("UPDATE tasks SET held = 0 WHERE id = ?", task_id)
            await tx.execute(
                "UPDATE fair_tenants SET held = held - 1 WHERE type = ? AND tenant = ? AND held > 0",
                int(row[0]),
                str(row[1]),
            )

    # -- a waiting tenant's first turn, at a claim ----------------------------------------------
    async def first_turn(self, tx: Tx, kind: int, tenant: str) -> tuple[str, bool] | None:
        """The task to run instead of a job of ``tenant`` being claimed, and whether it is held,
        while ``tenant`` has one running and another tenant holds tasks of type ``kind``
        (otherwise None: one index probe when nothing is held):

        1. a released job nobody claimed yet of a tenant with none running (the oldest): its turn
           was given at its release, it only waits in JetStream's line behind the jobs released
           before it; or else
        2. the first held task of the first tenant in turn order (of the first
           :data:`FIRST_TURN_SCAN` holding tasks of type ``kind``) that has none running and
           whose turn is due: its ``due`` is not after ``tenant``'s (when ``tenant`` holds tasks
           too). Taking a held task spends a turn of its tenant.

        Why: the buffer of released jobs is a queue in JetStream, and a worker's claims run ahead
        of its provider calls, so a tenant that queues behind another's backlog would wait for
        every job released before it (several provider calls). Handing its task to the next
        claim instead makes its wait one provider slot's turn, whatever the buffer's size.
        Its later tasks take their turns in the release order as usual; the claimed job goes back
        to the backlog at the front of its tenant (:meth:`hand_over`).

        Why "due" for a held task: with few slots (a provider admitting 2), a tenant of weight 1
        had nothing running each time a tenant of weight 3 ran both, and took every such claim:
        their starts came 1:1 (BENCHMARKS.md, "thirty-fourth pass"). A newcomer joins at the lane's
        virtual time, at or before every tenant holding work, so its first turn still comes at
        once. A released job had its turn already: taking it reorders the line, not the shares.
        """
        waiting = await tx.fetchval(
            "SELECT 1 FROM fair_tenants WHERE type = ? AND held > 0 AND tenant <> ? LIMIT 1", kind, tenant
        )
        if not waiting:
            return None
        running = await tx.fetchval(
            f"SELECT 1 FROM tasks WHERE type = ? AND status = {_RUNNING} AND tenant = ? LIMIT 1", kind, tenant
        )
        if not running:
            return None  # its own first turn: nobody to take it from
        # Among the first FIRST_TURN_SCAN released jobs the index gives (the buffer may hold
        # thousands while many tasks run; this runs at every such claim).
        released = await tx.fetchval(
            f"SELECT b.id FROM (SELECT id, tenant, create_time FROM tasks WHERE type = ? AND {_BUFFER}"
            " AND tenant <> ? LIMIT ?) AS b"
            f" WHERE NOT EXISTS (SELECT 1 FROM tasks r WHERE r.type = ? AND r.status = {_RUNNING}"
            " AND r.tenant = b.tenant)"
            " ORDER BY b.create_time, b.id LIMIT 1",
            kind,
            tenant,
            FIRST_TURN_SCAN,
            kind,
        )
        if released is not None:
            return str(released), False
        found = await tx.fetchval(
            "SELECT f.tenant FROM (SELECT tenant, due, served FROM fair_tenants WHERE type = ?"
            " AND held > 0 AND tenant <> ? AND due <= COALESCE((SELECT c.due FROM fair_tenants c"
            " WHERE c.type = ? AND c.tenant = ? AND c.held > 0), due)"
            " ORDER BY due, served, tenant LIMIT ?) AS f"
            f" WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.type = ? AND t.status = {_RUNNING}"
            " AND t.tenant = f.tenant)"
            " ORDER BY f.due, f.served, f.tenant LIMIT 1",
            kind,
            tenant,
            kind,
            tenant,
            FIRST_TURN_SCAN,
            kind,
        )
        if found is None:
            return None
        held = await tx.fetchval(
            "SELECT task_id FROM backlog WHERE type = ? AND tenant = ? ORDER BY rank, task_id LIMIT 1",
            kind,
            str(found),
        )
        return None if held is None else (str(held), True)

    async def hand_over(
        self,
        tx: Tx,
        claimed: task_pb2.Task,
        claimed_tenant: str,
        claimed_gen: int,
        other: str,
        other_tenant: str,
        other_held: bool,
        now: int,
    ) -> None:
        """The claim of ``claimed`` runs the held task ``other`` instead (:meth:`first_turn`; the
        caller holds both rows' locks and persists ``other``'s start).

        A held ``other`` leaves the backlog and its tenant spends a turn (its ``due`` moves on by
        its stride); it counts as dispatched with ``claimed``'s message, which now carries it (so
        the sweeper finds it if its worker is lost). A released ``other`` spent its turn at its
        release and keeps its own job (whose claim, when it comes, finds it running or ended:
        deferred, then done). ``claimed`` is held again at the front of its
        tenant (its rank is its creation's) and counts as never dispatched, under a new dispatch
        generation (a relay still marking its publication leaves it alone); the turn its release
        spent is given back (down to the lane's virtual time), so handing over costs its tenant
        no turn, and its delivered message is answered DONE from now on.
        """
        kind = int(claimed.type)
        if other_held:
            await self._carry(tx, claimed.id, other, other_tenant, kind, now)
        await tx.execute(
            "UPDATE tasks SET dispatched_at = NULL, stream_seq = NULL, dispatch_gen = ? WHERE id = ?",
            claimed_gen + 1,
            claimed.id,
        )
        await tx.execute("DELETE FROM outbox WHERE task_id = ?", claimed.id)  # a copy not sent yet
        # The turn its release spent is given back (it did not run: it is released again in a
        # later turn), down to the lane's virtual time at most: a job queued at its create, with
        # room and nothing held, spent no turn, and no tenant saves up turns (fairshare.joined).
        await tx.execute(
            "UPDATE fair_tenants SET due = CASE WHEN due - stride > v.vtime THEN due - stride"
            " WHEN due < v.vtime THEN due ELSE v.vtime END"
            " FROM (SELECT COALESCE(MAX(vtime), 0) AS vtime FROM fair_lanes WHERE type = ?) AS v"
            " WHERE type = ? AND tenant = ?",
            kind,
            kind,
            claimed_tenant,
        )
        job = Job(claimed.id, claimed_gen + 1, kind, int(claimed.priority))
        await self._hold(tx, claimed_tenant, job, micros(claimed.create_time))

    async def _carry(self, tx: Tx, claimed: str, other: str, other_tenant: str, kind: int, now: int) -> None:
        """The held ``other`` leaves the backlog (its tenant's turn spent) and is dispatched with
        ``claimed``'s message."""
        _, taken = await self._unhold(tx, [other], now)
        await tx.execute(
            "UPDATE fair_tenants SET due = due + stride,"
            " served = COALESCE((SELECT turns FROM fair_lanes WHERE type = ?), served),"
            " held = CASE WHEN held > ? THEN held - ? ELSE 0 END WHERE type = ? AND tenant = ?",
            kind,
            taken[other_tenant],
            taken[other_tenant],
            kind,
            other_tenant,
        )
        row = await tx.fetchrow("SELECT dispatched_at, stream_seq FROM tasks WHERE id = ?", claimed)
        assert row is not None
        dispatched = now if row[0] is None else int(row[0])
        await tx.execute(
            "UPDATE tasks SET dispatched_at = ?, stream_seq = ? WHERE id = ?", dispatched, row[1], other
        )

    # -- releases ------------------------------------------------------------------------------
    async def held_anywhere(self, tx: Tx, kinds: tuple[int, ...]) -> list[int]:
        """The task types with held tasks (one index probe each)."""
        found = []
        for kind in kinds:
            if await tx.fetchval("SELECT 1 FROM fair_tenants WHERE type = ? AND held > 0 LIMIT 1", kind):
                found.append(kind)
        return found

    async def release(self, unit: Unit, kind: int, now: int) -> tuple[int, bool]:
        """Releases held tasks of type ``kind`` into the outbox, in fair order, up to the room in
        the buffer (and the batch size); returns (how many, whether the batch size stopped it).

        The lane's row is locked first (PostgreSQL), so two replicas releasing one lane take
        turns instead of both filling the same room. Their jobs are handed to the local relay.
        """
        tx = unit.tx
        lock = f"SELECT vtime, turns FROM fair_lanes WHERE type = ?{self._lock}"
        lane = await tx.fetchrow(lock, kind)
        if lane is None:  # a task type the migration did not know: its lane starts here
            await tx.execute(
                "INSERT INTO fair_lanes (type, vtime, turns) VALUES (?, 0, 0) ON CONFLICT DO NOTHING", kind
            )
            lane = await tx.fetchrow(lock, kind)
            assert lane is not None
        running, released, held = await self.measure(tx, kind)
        room = self._target(running, kind) - released
        budget = min(room, self._config.batch)
        if budget <= 0 or not held:
            return 0, False
        found = await tx.fetch(
            "SELECT tenant, due, served, held FROM fair_tenants WHERE type = ? AND held > 0"
            " ORDER BY due, served, tenant LIMIT ?",
            kind,
            budget,
        )
        turns = [Turn(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in found]
        step = fairshare.plan(turns, budget, self.weight, int(lane[0]), int(lane[1]))
        jobs = await self._next_tasks(tx, kind, step.order)
        live, taken = await self._unhold(tx, [job.task_id for job in jobs], now)
        for job in jobs:
            if job.task_id in live:
                handed = await self._outbox.enqueue(tx, job, now, hand_off=True)
                if handed is not None:
                    unit.handed.append(handed)
        # Held counts go down by the backlog rows this release took out, not by the turns planned:
        # a cancel or a claim's hand-over may have taken a planned task meanwhile (and counted it),
        # and a create may have held one more since the rows were read (PostgreSQL).
        await tx.executemany(
            "UPDATE fair_tenants SET due = ?, served = ?, stride = ?,"
            " held = CASE WHEN held > ? THEN held - ? ELSE 0 END WHERE type = ? AND tenant = ?",
            [
                (t.due, t.served, fairshare.stride(self.weight(name)), taken[name], taken[name], kind, name)
                for name, t in sorted(step.after.items())
            ],
        )
        await tx.execute(
            "UPDATE fair_lanes SET vtime = ?, turns = ? WHERE type = ?", step.vtime, step.turns, kind
        )
        return len(live), budget == self._config.batch and room > budget

    async def _next_tasks(self, tx: Tx, kind: int, order: tuple[str, ...]) -> list[Job]:
        """The jobs of the planned turns, in turn order: a tenant's n-th turn takes its n-th task.
        A tenant with fewer tasks than its count said (a count off) gives fewer."""
        queues: dict[str, collections.deque[Job]] = {}
        for tenant, n in collections.Counter(order).items():
            rows = await tx.fetch(
                "SELECT task_id, priority, dispatch_gen, traceparent FROM backlog"
                " WHERE type = ? AND tenant = ? ORDER BY rank, task_id LIMIT ?",
                kind,
                tenant,
                n,
            )
            queues[tenant] = collections.deque(
                Job(str(r[0]), int(r[2]), kind, int(r[1]), str(r[3])) for r in rows
            )
        jobs = []
        for tenant in order:
            if queues[tenant]:
                jobs.append(queues[tenant].popleft())
        return jobs

    async def _unhold(
        self, tx: Tx, task_ids: list[str], now: int
    ) -> tuple[set[str], collections.Counter[str]]:
        """Takes the tasks out of the backlog, dispatched at ``now`` (their jobs go to the outbox
        in this transaction); returns those still queued (the others ended while held by a path
        that did not drop them: nothing to release), and the backlog rows this took out per
        tenant (one that a concurrent cancel or hand-over took is not)."""
        if not task_ids:
            return set(), collections.Counter()
        marks = ", ".join("?" * len(task_ids))
        if self._lock:
            # PostgreSQL: the rows locked in id order first, the order a worker's batch of claims
            # takes them in (``Commands._each``). The UPDATE alone locks them in the order its
            # plan reads them (a bitmap scan: where they lie in the table), and a release and a
            # batch of claims sharing two tasks deadlocked (a mixed-load probe, BENCHMARKS.md
            # "thirty-second pass").
            await tx.fetch(f"SELECT id FROM tasks WHERE id IN ({marks}) ORDER BY id{self._lock}", *task_ids)
        # Tasks first, then the backlog: the order a cancel locks them in (no deadlock). Only
        # ids in the condition: with a status term SQLite would read every queued task through
        # tasks_dispatched instead of the 256 primary keys.
        found = await tx.fetch(
            f"UPDATE tasks SET held = 0, dispatched_at = ? WHERE id IN ({marks}) RETURNING id, status",
            now,
            *task_ids,
        )
        taken = await tx.fetch(f"DELETE FROM backlog WHERE task_id IN ({marks}) RETURNING tenant", *task_ids)
        return {str(r[0]) for r in found if int(r[1]) == _QUEUED}, collections.Counter(
            str(r[0]) for r in taken
        )
