"""Units of work: one write transaction, its task changes appended as events last, and what
happens right after its commit (events to the bus, new jobs to the local relay).

**No gap for watchers.** Events of a transaction are inserted at its very end, after the events
lock (:attr:`Dialect.append_event`): on PostgreSQL a transaction-scoped advisory lock, held until
commit, so the transaction that takes sequence N commits before any transaction can take N+1.
Sequence order is therefore commit order, and a watcher that has read up to N never later sees a
committed event below N. SQLite gets the same property from its single writer. The cost is that
event-writing commits are serialized, as on SQLite (README, "PostgreSQL", has the numbers).

Envelopes of new events are handed to ``on_events`` right after commit (see the backends for the
thread and the order). The jobs of tasks a unit created are handed to the local relay earlier,
as soon as the backend guarantees that nothing they cause is decided before the commit
(``on_sealed`` of :meth:`Backend.write`): on SQLite, while the commit's fsync is still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from charai.core.timestamps import set_micros
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import Backend, Tx
from charai.task_store.eta import EtaBook
from charai.task_store.outbox import OutboxRow
from charai.task_store.push import Offers, Outlet
from charai.tasks.v1 import task_pb2

if TYPE_CHECKING:
    from charai.task_store.webhooks import Webhooks

T = TypeVar("T")
#: An event's task row write: the state columns, then what every event writes. The row's
#: ``update_time`` column is when its state last changed (the task's own ``update_time``, in the
#: blob, is its last change of any kind): every reader of the column (retention, reuse, the
#: throughput stat) asks when a task ended or completed. So a progress report writes none of the
#: indexed columns (``tasks_ended`` and ``tasks_reuse`` carry ``update_time``) and touches no index
#: of ``tasks``: on PostgreSQL it is a HOT update. An older task_store, which moves the column on
#: every event, gives every reader the same answers (a rolling upgrade needs no migration).
_STATE = "status = ?, next_attempt_time = ?, update_time = ?, "
_ROW_TAIL = "attempt = ?, lease_expires = ?, lease_owner = ?, {seq}task = ? WHERE id = ?"
#: The row writes by (whether the state columns stay, whether ``last_seq`` is written): without
#: it, a row written before its event (PostgreSQL, ``write_each``); see ``UnitRunner._write_row``.
_ROW_WRITES = {
    (same, seq): "UPDATE tasks SET "
    + ("" if same else _STATE)
    + _ROW_TAIL.format(seq="last_seq = ?, " if seq else "")
    for same in (False, True)
    for seq in (False, True)
}
EventsHook = Callable[[list[spb.EventEnvelope]], None]
HandOffHook = Callable[[list[OutboxRow]], None]


@dataclasses.dataclass(slots=True)
class _Save:
    """A task change waiting for its event (written at the end of the unit of work)."""

    #: The event's envelope, all but its sequences (known once the event is inserted); its
    #: ``event.task`` is the snapshot of the task.
    envelope: spb.EventEnvelope
    blob: bytes
    tenant: str
    event_type: int
    now: int
    prev_seq: int
    lease_expires: int | None
    next_attempt_time: int | None
    #: Who holds the lease after the event (written with the row, as the lease expiry is).
    lease_owner: str | None = None
    #: The event left the row's indexed state columns (status, next_attempt_time, and with them
    #: the row's update_time: see _ROW_TAIL) as they were (a progress report): the row write
    #: leaves them out, so no index over them is touched.
    same_state: bool = False
    #: The event's sequence when it was inserted ahead of the unit's end (a create's, on SQLite:
    #: :meth:`UnitRunner.insert_now`); the row then carries it from its insert.
    seq: int | None = None
    #: The task's row is written already, all but its ``last_seq`` (PostgreSQL: an operation of
    #: :meth:`UnitRunner.write_each` before the next one ran); the event is inserted at the end.
    row_written: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Mark:
    """How much a :class:`Unit` had recorded at a savepoint (see :meth:`Unit.mark`)."""

    saves: int
    handed: int
    handed_new: int
    pushed: int
    written: int
    queued: int
    room: dict[int, int]
    fair_locked: frozenset[str]


@dataclasses.dataclass(slots=True)
class Unit:
    """One write transaction and the task changes it will commit."""

    tx: Tx
    saves: list[_Save] = dataclasses.field(default_factory=list)
    #: Fills each saved task's estimated start/end time (None: left as they are).
    eta: EtaBook | None = None
    #: Jobs this unit released from the fair backlog, already claimed for the local relay (see
    #: ``TaskStore.hand_off``): handed over after the commit.
    handed: list[OutboxRow] = dataclasses.field(default_factory=list)
    #: The first jobs of tasks this unit created, claimed for the relay too: handed over before
    #: the commit where the backend allows it (``on_sealed``). Should the commit fail, such a
    #: job names a task id that never existed, so it can never share its ``Nats-Msg-Id`` (task
    #: id and dispatch generation) with a real job, which JetStream would then drop as a
    #: duplicate. A released held task's job could (its release rolled back, the next one
    #: publishes the same generation): those wait in ``handed`` for the commit.
    handed_new: list[OutboxRow] = dataclasses.field(default_factory=list)
    #: Jobs this unit claimed for workers' standing offers (:mod:`charai.task_store.push`):
    #: sent on their streams after the commit.
    pushed: list[tuple[Outlet, spb.ExchangeStreamResponse]] = dataclasses.field(default_factory=list)
    #: Other outbox rows this unit wrote (webhook deliveries): the relay is woken after commit.
    queued: int = 0
    #: Room left in each task type's buffer of released jobs, once this unit measured it (fair
    #: share, :meth:`Backlog.admit`): a batch of creates counts the buffer once.
    room: dict[int, int] = dataclasses.field(default_factory=dict)
    #: Tenants whose fair-share lock this unit holds (PostgreSQL; ``Backlog._lock_tenant``).
    fair_locked: set[str] = dataclasses.field(default_factory=set)
    #: Events already written by this unit (:meth:`UnitRunner.write_each` writes each
    #: operation's before the next one runs), published with the rest after commit.
    written: list[spb.EventEnvelope] = dataclasses.field(default_factory=list)

    def mark(self) -> Mark:
        """Where the unit stands, for :meth:`reset` after rolling back to a savepoint."""
        return Mark(
            len(self.saves),
            len(self.handed),
            len(self.handed_new),
            len(self.pushed),
            len(self.written),
            self.queued,
            dict(self.room),
            frozenset(self.fair_locked),
        )

    def reset(self, mark: Mark) -> list[Outlet]:
        """Forgets what the unit recorded since ``mark`` (its writes were rolled back); the
        streams of the pushes it forgot, whose offers' slots the caller gives back."""
        dropped = [outlet for outlet, _ in self.pushed[mark.pushed :]]
        del self.saves[mark.saves :]
        del self.handed[mark.handed :]
        del self.handed_new[mark.handed_new :]
        del self.pushed[mark.pushed :]
        del self.written[mark.written :]
        self.queued, self.room = mark.queued, mark.room
        # A lock taken in a savepoint rolled back to is released with it.
        self.fair_locked = set(mark.fair_locked)
        return dropped

    def save(
        self,
        task: task_pb2.Task,
        tenant: str,
        event_type: int,
        now: int,
        prev_seq: int,
        *,
        lease_expires: int | None = None,
        next_attempt_time: int | None = None,
        lease_owner: str | None = None,
        same_state: bool = False,
    ) -> None:
        """Records the task as it is now, with its event; its row and its event are written at
        the end of the unit (:meth:`UnitRunner._append_events`), so an operation must not read
        the row back after this (a create's event may be inserted at once instead, and its row
        with it: :meth:`UnitRunner.insert_now`). ``task`` may change further: the snapshot is a
        copy."""
        set_micros(task.update_time, now)
        task.queue_position = 0
        if self.eta is not None:
            self.eta.fill(task, now / 1e6)
        envelope = spb.EventEnvelope(tenant=tenant)
        envelope.event.type = event_type  # type: ignore[assignment]
        set_micros(envelope.event.time, now)
        snapshot = envelope.event.task
        snapshot.CopyFrom(task)
        self.saves.append(
            _Save(
                envelope=envelope,
                blob=snapshot.SerializeToString(),
                tenant=tenant,
                event_type=event_type,
                now=now,
                prev_seq=prev_seq,
                lease_expires=lease_expires,
                next_attempt_time=next_attempt_time,
                lease_owner=lease_owner,
                same_state=same_state,
            )
        )


_INSERT_EVENT = "INSERT INTO events (task_id, tenant, task_type, type, time, task) VALUES (?, ?, ?, ?, ?, ?)"

#: One operation of a unit of work (what :meth:`UnitRunner.write` runs).
Op = Callable[[Unit], Coroutine[Any, Any, T]]


class UnitRunner:
    """Runs units of work on a backend and publishes what they committed."""

    def __init__(self, backend: Backend, on_events: EventsHook | None = None) -> None:
        self._db = backend
        self._append_sql = backend.dialect.append_event
        self._append_seq_sql = backend.dialect.append_event_seq
        self._on_events = on_events
        #: Estimated times for the events' task snapshots (see :class:`Unit`).
        self.eta: EtaBook | None = None
        self.hand_off: HandOffHook | None = None
        #: Records the webhook deliveries of stored events (None: no webhooks).
        self.webhooks: Webhooks | None = None
        #: Workers' standing offers, given back a slot when a push is rolled back (None: off).
        self.offers: Offers | None = None
        #: Called after a commit that wrote outbox rows not handed off (may be another thread).
        self.on_outbox: Callable[[], None] | None = None

    async def write(self, op: Op[T]) -> T:
        """Runs ``op`` in one transaction, appends its events last, publishes them after commit."""
        envelopes: list[spb.EventEnvelope] = []
        handed: list[OutboxRow] = []
        handed_new: list[OutboxRow] = []
        pushed: list[tuple[Outlet, spb.ExchangeStreamResponse]] = []
        queued = [0]

        def give_back(unsent: list[tuple[Outlet, spb.ExchangeStreamResponse]]) -> None:
            # Pushes recorded by a transaction that did not commit were never sent: their offers
            # get the slots back (a push sent after the commit is no longer in ``pushed``).
            if self.offers is not None:
                for outlet, _ in unsent:
                    self.offers.give_back(outlet)
            unsent.clear()

        async def body(tx: Tx) -> T:
            envelopes.clear()  # a retried transaction starts over
            handed.clear()
            handed_new.clear()
            give_back(pushed)
            unit = Unit(tx, eta=self.eta)
            try:
                result = await op(unit)
                envelopes.extend(unit.written)
                envelopes.extend(await self._append_events(unit))
            except BaseException:
                give_back(unit.pushed)
                raise
            handed.extend(unit.handed)
            handed_new.extend(unit.handed_new)
            pushed.extend(unit.pushed)
            queued[0] = unit.queued
            return result

        def sealed() -> None:
            # Before the commit where the backend allows it (Backend.write): the claims of these
            # jobs cannot be decided before the commit; events wait for it.
            self._hand(handed_new)

        def committed() -> None:
            if envelopes and self._on_events is not None:
                self._on_events(list(envelopes))
            if pushed and self.offers is not None:
                sent = list(pushed)
                pushed.clear()
                self.offers.send(sent)
            self._hand(handed)
            if queued[0] and self.on_outbox is not None:
                self.on_outbox()

        try:
            return await self._db.write(body, committed, sealed)
        except Exception:  # not a cancelled caller: the write goes on without it (Backend.write)
            give_back(pushed)  # its COMMIT failed: nothing was pushed
            raise

    def _hand(self, rows: list[OutboxRow]) -> None:
        if rows and self.hand_off is not None:
            self.hand_off(list(rows))

    async def write_each(self, ops: Sequence[Op[T]]) -> list[T | Exception]:
        """Runs independent operations in one transaction, each as if in a savepoint of its own:
        its result, or the error it raised with its writes and recorded events rolled back (the
        others kept), as if each were its own unit of work but with one commit for all. An error
        the backend runs a whole transaction again for (a PostgreSQL deadlock) is not caught.

        Each operation's task rows are written before the next one runs, so a later operation
        reads what an earlier one changed (a progress report after its task's completion in the
        same call is refused, as it would be alone), not the rows as they were when the
        transaction began. Its events too on SQLite; on PostgreSQL they are inserted at the
        unit's end, as :meth:`write` does, so the events lock is the last lock the transaction
        takes (:meth:`_write_rows` says why).

        Several operations first run together in one savepoint (:meth:`_in_savepoint`): one
        savepoint instead of one each, and pages that several of them change (a table's or an
        index's last leaf) are saved for rollback once. Should any of them raise, that savepoint
        is rolled back and they all run again, each in a savepoint of its own, so the answers are
        the same either way; an operation is written to run again anyway (a retried transaction
        runs the whole unit again).

        Past the dialect's ``max_savepoints`` (PostgreSQL: 64), the operations run in order as
        several such transactions of at most that many each, one after the other, so a caller
        is answered once all are committed. They go on to the last if the caller stops waiting,
        as one write would (:meth:`Backend.write`)."""
        limit = self._db.dialect.max_savepoints
        if limit is not None and len(ops) > limit:
            chunks = [ops[start : start + limit] for start in range(0, len(ops), limit)]
            return await asyncio.shield(asyncio.ensure_future(self._write_chunks(chunks)))

        async def op(unit: Unit) -> list[T | Exception]:
            if len(ops) > 1:
                together = await self._in_savepoint(unit, ops)
                if not isinstance(together, Exception):
                    return together
            answers: list[T | Exception] = []
            for one in ops:
                alone = await self._in_savepoint(unit, [one])
                answers.append(alone if isinstance(alone, Exception) else alone[0])
            return answers

        return await self.write(op)

    async def _in_savepoint(self, unit: Unit, ops: Sequence[Op[T]]) -> list[T | Exception] | Exception:
        """Runs ``ops`` in order in one savepoint: their results; or, when one of them raises,
        its error, with everything they wrote and recorded undone (the pushes they recorded give
        their offers' slots back)."""
        mark = unit.mark()
        await unit.tx.execute("SAVEPOINT each")
        answers: list[T | Exception] = []
        try:
            for one in ops:
                answers.append(await one(unit))
                if self._append_sql is None:
                    unit.written.extend(await self._append_events(unit))
                    unit.saves.clear()
                else:
                    await self._write_rows(unit)
        except Exception as exc:
            if isinstance(exc, self._db.retryable):
                raise
            await unit.tx.execute("ROLLBACK TO SAVEPOINT each")
            await unit.tx.execute("RELEASE SAVEPOINT each")
            for outlet in unit.reset(mark):
                if self.offers is not None:
                    self.offers.give_back(outlet)
            return exc
        await unit.tx.execute("RELEASE SAVEPOINT each")
        return answers

    async def _write_chunks(self, chunks: Sequence[Sequence[Op[T]]]) -> list[T | Exception]:
        answers: list[T | Exception] = []
        for chunk in chunks:
            answers.extend(await self.write_each(chunk))
        return answers

    async def _write_row(self, tx: Tx, save: _Save, seq: int | None) -> None:
        """Writes the save's task row, with ``seq`` as its ``last_seq`` (None: left as it is).
        An event that keeps the indexed state columns leaves them out of the write (see _Save)."""
        task = save.envelope.event.task
        args: list[Any] = [] if save.same_state else [int(task.status), save.next_attempt_time, save.now]
        args += [task.attempt, save.lease_expires, save.lease_owner]
        if seq is not None:
            args.append(seq)
        await tx.execute(_ROW_WRITES[save.same_state, seq is not None], *args, save.blob, task.id)

    async def _write_rows(self, unit: Unit) -> None:
        """Writes the task rows of the unit's saves not written yet, but not their events
        (PostgreSQL, after each operation of :meth:`write_each`): the next operation reads the
        rows as this one left them, and the events wait for the unit's end.

        Why not the events too (as on SQLite): an event takes the events lock, held until commit,
        and the next operation then takes row locks (its tasks' rows, a tenant's fair-share
        row) while holding it. A transaction holding one of those rows and about to write its
        own events waited for the lock, this one for the row: a deadlock, which PostgreSQL
        breaks after its ``deadlock_timeout`` (1 s) by failing one of them (48 of the 54
        deadlocks of a stress probe of two replicas, BENCHMARKS.md "thirty-second pass"). With
        the events last in every transaction, a transaction that holds the events lock waits
        for no row but its commit's."""
        for save in unit.saves:
            if save.row_written or save.seq is not None:
                continue
            await self._write_row(unit.tx, save, None)
            save.row_written = True

    async def _append_events(self, unit: Unit) -> list[spb.EventEnvelope]:
        """Inserts the unit's events and writes its task rows, under the events lock.

        Last in the transaction on purpose: the lock is held from here to commit, so the shorter
        this tail, the less event-writing transactions wait for each other.
        """
        last: dict[str, int] = {}
        envelopes = []
        for save in unit.saves:
            envelope = save.envelope
            task_id = envelope.event.task.id
            seq = await self._append_event(unit.tx, save)
            envelope.event.sequence = seq
            if self.webhooks is not None and envelope.event.task.HasField("webhook"):
                unit.queued += await self.webhooks.on_event(unit.tx, save.tenant, envelope.event, save.now)
            envelope.prev_sequence = last.get(task_id, save.prev_seq)
            envelopes.append(envelope)
            last[task_id] = seq
        # A create's event inserted ahead (insert_now) has a lower sequence than the events of
        # tasks changed earlier in the unit: the envelopes go out in sequence order.
        envelopes.sort(key=lambda e: e.event.sequence)
        return envelopes

    async def insert_now(self, unit: Unit) -> int:
        """Inserts the event of the unit's latest save (a create's) now, not at the unit's end,
        and returns its sequence, so the new task's row is inserted with it and not written a
        second time; 0 on PostgreSQL, whose events are appended last, under the events lock
        (SQLite has one writer: any sequence taken is in commit order)."""
        save = unit.saves[-1]
        if self._append_sql is not None:
            return 0
        task = save.envelope.event.task
        save.seq = await unit.tx.insert(
            _INSERT_EVENT, "seq", task.id, save.tenant, int(task.type), save.event_type, save.now, save.blob
        )
        return save.seq

    async def _append_event(self, tx: Tx, save: _Save) -> int:
        if save.seq is not None:
            return save.seq
        task = save.envelope.event.task
        event_args = (task.id, save.tenant, int(task.type), save.event_type, save.now, save.blob)
        if save.row_written and self._append_seq_sql is not None:
            return int(await tx.fetchval(self._append_seq_sql, *event_args))
        if self._append_sql is not None:
            seq = await tx.fetchval(
                self._append_sql,
                *event_args,
                int(task.status),
                task.attempt,
                save.same_state,
                save.lease_expires,
                save.next_attempt_time,
                save.lease_owner,
            )
            return int(seq)
        seq = await tx.insert(_INSERT_EVENT, "seq", *event_args)
        await self._write_row(tx, save, seq)
        return seq
