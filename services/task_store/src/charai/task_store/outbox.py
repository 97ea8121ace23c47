"""The transactional outbox: a task's job is written in the same transaction as the task, and
relays publish it to JetStream from here.

Relays *claim* rows for a while (``claimed_by``/``claimed_until``, picked with ``SKIP LOCKED``),
publish them, then delete them, so replicas never publish the same row at once, and a dead
replica's claims expire. The sweeper's suspects are claimed the same way (their
``dispatched_at`` is moved forward), so each is examined by one replica; a re-dispatch is
conditional on the dispatch generation (``TaskStore.redispatch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from charai.core.clock import Clock
from charai.core.domain.states import Status
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import Backend, Tx
from charai.task_store.schema import UNFINISHED


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    task_id: str
    dispatch_gen: int
    subject: str
    payload: bytes


def handed_claimant(owner: str) -> str:
    """Who holds the outbox row of a job handed to relay ``owner`` (``TaskStore.hand_off``):
    not ``owner`` itself, whose claims re-take their own rows at once."""
    return f"{owner}+handed"


def _rows(raw: Iterable[Sequence[object]]) -> list[OutboxRow]:
    return [OutboxRow(int(r[0]), str(r[1]), int(r[2]), str(r[3]), bytes(r[4])) for r in raw]  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """A job to queue: which task, which generation, who gets it first."""

    task_id: str
    dispatch_gen: int
    type: int
    priority: int
    traceparent: str = ""
    #: The worker the create pushed the task to (``Job.pushed_to``), "" if none.
    pushed_to: str = ""

    def message(self) -> spb.Job:
        """What JetStream carries (and a push, see ``WorkerOffer``)."""
        return spb.Job(
            task_id=self.task_id,
            dispatch_gen=self.dispatch_gen,
            type=self.type,  # type: ignore[arg-type]
            priority=self.priority,  # type: ignore[arg-type]
            traceparent=self.traceparent,
            pushed_to=self.pushed_to,
        )


class Outbox:
    """Writes jobs into the outbox and serves the relays' and the sweeper's claims."""

    def __init__(
        self,
        backend: Backend,
        topology: Topology,
        clock: Clock,
        claim_seconds: float,
        hand_off_claim_seconds: float,
    ) -> None:
        self._db = backend
        self._skip_locked = backend.dialect.skip_locked
        self._topology = topology
        self._clock = clock
        self._claim_us = int(claim_seconds * 1e6)
        self._hand_off_us = int(hand_off_claim_seconds * 1e6)
        #: The local relay new jobs are handed to (``TaskStore.hand_off``), "" for none.
        self.hand_off_owner = ""

    # -- writing jobs (inside a command's transaction) -------------------------------------
    async def enqueue(self, tx: Tx, job: Job, now: int, *, hand_off: bool = False) -> OutboxRow | None:
        """Queues ``job``. With ``hand_off`` and a local relay, the row is written claimed by
        that relay (briefly) and returned, for the caller to hand over after commit."""
        subject = self._topology.job_subject(job.type, job.priority)
        payload = job.message().SerializeToString()
        if not (hand_off and self.hand_off_owner):
            await tx.execute(
                "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created)"
                " VALUES (?, ?, ?, ?, ?)",
                job.task_id,
                job.dispatch_gen,
                subject,
                payload,
                now,
            )
            return None
        row_id = await tx.insert(
            "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created, claimed_by, claimed_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            "id",
            job.task_id,
            job.dispatch_gen,
            subject,
            payload,
            now,
            handed_claimant(self.hand_off_owner),
            now + self._hand_off_us,
        )
        return OutboxRow(row_id, job.task_id, job.dispatch_gen, subject, payload)

    # -- relays ------------------------------------------------------------------------------
    async def pending(self, limit: int = 256) -> list[OutboxRow]:
        """Every job not yet confirmed published, oldest first, claimed or not (a read: for
        checks and tests; relays use :meth:`claim`)."""

        async def body(tx: Tx) -> list[OutboxRow]:
            return _rows(
                await tx.fetch(
                    "SELECT id, task_id, dispatch_gen, subject, payload FROM outbox ORDER BY id LIMIT ?",
                    limit,
                )
            )

        return await self._db.read(body)

    async def claim(
        self, owner: str, limit: int = 256, sent: Sequence[tuple[OutboxRow, int]] = ()
    ) -> list[OutboxRow]:
        """Claims up to ``limit`` unpublished jobs for ``owner`` (a relay), oldest first.

        A row is claimable when nobody holds it, its claim expired, or ``owner`` already holds it
        (so a relay retries its own failures at once). ``SKIP LOCKED``: two replicas claiming at
        the same moment take different rows instead of waiting for each other.

        ``sent``: the jobs ``owner`` published since its previous claim, with their JetStream
        sequences. They are recorded first, in the same transaction (see :meth:`mark`), so a
        relay writes once per batch rather than twice, and its own published rows are gone
        before it claims again. A relay that dies before this commits leaves them claimed: they
        are re-published when the claims expire, and JetStream drops the repeats (same
        ``Nats-Msg-Id``).
        """

        async def body(tx: Tx) -> list[OutboxRow]:
            if sent:
                await self._mark(tx, sent)
            now = self._clock.now_us()
            rows = await tx.fetch(
                "UPDATE outbox SET claimed_by = ?, claimed_until = ? WHERE id IN ("
                "SELECT id FROM outbox WHERE claimed_until IS NULL OR claimed_until < ? OR claimed_by = ?"
                f" ORDER BY id LIMIT ?{self._skip_locked})"
                " RETURNING id, task_id, dispatch_gen, subject, payload",
                owner,
                now + self._claim_us,
                now,
                owner,
                limit,
            )
            return sorted(_rows(rows), key=lambda r: r.id)

        return await self._db.write(body)

    async def release(self, owner: str, sent: Sequence[tuple[OutboxRow, int]] = ()) -> None:
        """Gives back the rows ``owner`` claimed and did not publish (a relay that stops), after
        recording ``sent``, the jobs it published since its last claim (one transaction)."""

        async def body(tx: Tx) -> None:
            if sent:
                await self._mark(tx, sent)
            await tx.execute(
                "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by IN (?, ?)",
                owner,
                handed_claimant(owner),
            )

        await self._db.write(body)

    async def mark(self, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        """Records the JetStream sequence of each published job and drops its outbox row."""
        await self._db.write(lambda tx: self._mark(tx, sent))

    async def _mark(self, tx: Tx, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        # One order for every writer of these rows, so two relays cannot deadlock.
        ordered = sorted(sent, key=lambda s: (s[0].task_id, s[0].id))
        webhook = self._topology.webhook_subject
        jobs = [(seq, r.task_id, r.dispatch_gen) for r, seq in ordered if r.subject != webhook]
        # The task rows before the outbox rows: the order every other writer of both takes them
        # in (a task's row is locked, then its outbox row deleted: DeleteTask, a claim's
        # hand-over). Outbox rows first, a relay marking a job deadlocked with a claim handing
        # that task over (PostgreSQL; a mixed-load probe, BENCHMARKS.md "thirty-second pass").
        if jobs:
            # The sequence alone: ``dispatched_at`` was set when the job entered the outbox (and
            # the sweep leaves a task alone while its job is still there), so this writes no
            # indexed column (a heap-only update on PostgreSQL, no index entry moved on SQLite).
            # A task that ended meanwhile (a quick job often ends before its relay records it)
            # keeps its row as it is: only the sweep reads the sequence, of unfinished tasks.
            await tx.executemany(
                f"UPDATE tasks SET stream_seq = ? WHERE id = ? AND dispatch_gen = ? AND {UNFINISHED}", jobs
            )
        # By task too: a row handed off before a commit that then failed may share its id with a
        # later row (the id was rolled back with it), which must stay.
        await tx.executemany(
            "DELETE FROM outbox WHERE id = ? AND task_id = ?", [(r.id, r.task_id) for r, _ in ordered]
        )
        deliveries = [(seq, r.task_id, r.dispatch_gen) for r, seq in ordered if r.subject == webhook]
        if deliveries:  # a webhook job's row names its delivery where a task job's names the task
            await tx.executemany(
                "UPDATE webhook_deliveries SET stream_seq = ? WHERE id = ? AND dispatch_gen = ?", deliveries
            )

    # -- the sweeper -------------------------------------------------------------------------
    async def stale(self, older_than_s: float, limit: int = 200) -> list[tuple[str, int, int | None]]:
        """Claims unfinished tasks whose job was dispatched long ago and has left the outbox
        (published): (task id, dispatch gen, stream seq).

        The sweeper checks each job is still in the stream and re-dispatches those that are not.
        Claiming moves ``dispatched_at`` to now, so another replica's sweeper leaves these tasks
        alone for ``older_than_s`` (and so does the next sweep when the job is still there).
        """

        async def body(tx: Tx) -> list[tuple[str, int, int | None]]:
            now = self._clock.now_us()
            rows = await tx.fetch(
                "UPDATE tasks SET dispatched_at = ? WHERE id IN ("
                f"SELECT id FROM tasks WHERE {UNFINISHED} AND dispatched_at IS NOT NULL AND dispatched_at < ?"
                " AND (status = ? OR lease_expires < ?)"
                " AND (next_attempt_time IS NULL OR next_attempt_time < ?)"
                " AND id NOT IN (SELECT task_id FROM outbox)"
                f" ORDER BY dispatched_at LIMIT ?{self._skip_locked})"
                " RETURNING id, dispatch_gen, stream_seq",
                now,
                now - int(older_than_s * 1e6),
                int(Status.QUEUED),
                now,
                now,
                limit,
            )
            return [(r[0], int(r[1]), None if r[2] is None else int(r[2])) for r in rows]

        return await self._db.write(body)

    async def touch(self, task_ids: Iterable[str]) -> None:
        """Marks the jobs of these tasks as seen in the stream just now."""
        ids = sorted(task_ids)

        async def body(tx: Tx) -> None:
            now = self._clock.now_us()
            await tx.executemany("UPDATE tasks SET dispatched_at = ? WHERE id = ?", [(now, i) for i in ids])

        await self._db.write(body)
