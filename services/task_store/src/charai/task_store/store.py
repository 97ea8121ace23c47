"""The task store: tasks, metadata index, append-only event log and outbox — on any backend.

Every operation below is one unit of work (one transaction for writes) written once over the
:class:`~charai.task_store.backend.Tx` port; :class:`SqliteStore` and :class:`PostgresStore` only
choose the backend. What keeps the rules true on both:

- **Fencing.** A write reads the task row ``FOR UPDATE`` (PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
  excludes every other writer), checks the transition and the attempt, then writes. Two replicas
  cannot both claim, complete or cancel the same task.
- **No gap for watchers.** Events of a transaction are inserted at its very end, after the events
  lock (:attr:`Dialect.append_event`): on PostgreSQL a transaction-scoped advisory lock, held until
  commit, so the transaction that takes sequence N commits before any transaction can take N+1.
  Sequence order is therefore commit order, and a watcher that has read up to N never later sees a
  committed event below N. SQLite gets the same property from its single writer. The cost is that
  event-writing commits are serialized, as on SQLite (README, "PostgreSQL", has the numbers).
- **Outbox.** The task and its job are committed together. Relays *claim* rows for a while
  (``claimed_by``/``claimed_until``, picked with ``SKIP LOCKED``), publish them, then delete them,
  so replicas never publish the same row at once, and a dead replica's claims expire.
- **Sweeper.** Suspect tasks are claimed the same way (their ``dispatched_at`` is moved forward),
  so each is examined by one replica; a re-dispatch is conditional on the dispatch generation.

Envelopes of new events are handed to ``on_events`` right after commit (see the backends for the
thread and the order).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from charai.core.domain import states
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.domain.states import Stage, Status, Transition
from charai.core.errors import CharaiError, NotFoundError, StaleAttemptError, TaskEndedError
from charai.core.topology import Topology
from charai.core.validation import RequestInvalidError, Violation, fill_metadata
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import Backend, Dialect, Tx
from charai.task_store.postgres_backend import PostgresBackend
from charai.task_store.sqlite_backend import SqliteBackend
from charai.tasks.v1 import task_pb2, task_service_pb2

T = TypeVar("T")
EVENT_TYPES = {
    Transition.START: task_pb2.TASK_EVENT_TYPE_STARTED,
    Transition.PROGRESS: task_pb2.TASK_EVENT_TYPE_PROGRESS,
    Transition.RETRY: task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED,
    Transition.COMPLETE: task_pb2.TASK_EVENT_TYPE_COMPLETED,
    Transition.FAIL: task_pb2.TASK_EVENT_TYPE_FAILED,
    Transition.CANCEL: task_pb2.TASK_EVENT_TYPE_CANCELLED,
    Transition.REQUEUE: task_pb2.TASK_EVENT_TYPE_QUEUED,
}
DEFAULT_PAGE = 50
#: Every lane GetQueueStats reports (empty ones too, so a dashboard's series never vanish).
LANE_TYPES = (task_pb2.TASK_TYPE_IMAGE_GENERATION, task_pb2.TASK_TYPE_TTS_GENERATION)
LANE_PRIORITIES = (task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_LOW)
#: Throughput window of GetQueueStats.
THROUGHPUT_WINDOW_S = 60.0
#: Median-wait window of GetQueueStats, and how far back in the event log it looks at most
#: (a bounded primary-key range scan, so the query costs the same on a years-old log).
WAIT_WINDOW_S = 300.0
WAIT_SCAN_EVENTS = 50_000
#: How many tasks queued behind a task ``queue_position`` counts before it counts the ones ahead
#: instead (SQLite's lane counters; see :meth:`TaskStore._position`).
BEHIND_SCAN = 256
_TASK_COLUMNS = "task, tenant, attempt, lease_expires, dispatch_gen, last_seq, next_attempt_time, status"


def now_us() -> int:
    return time.time_ns() // 1000


def handed_claimant(owner: str) -> str:
    """Who holds the outbox row of a job handed to relay ``owner`` (``TaskStore.hand_off``):
    not ``owner`` itself, whose claims re-take their own rows at once."""
    return f"{owner}+handed"


def tenant_token(tenant: str) -> str:
    """A subject-safe token for a tenant name."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    max_attempts: int = 6
    lease_seconds: float = 30.0
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    namespace: str = "charai"
    #: How long a relay owns the outbox rows it claimed. A relay that dies (or cannot reach
    #: NATS) without marking them leaves them to the other replicas after this.
    outbox_claim_seconds: float = 30.0
    #: How long a job handed straight to the local relay stays claimed by it (short: it only has
    #: to cover one publish; a relay that died before publishing holds it no longer than this).
    hand_off_claim_seconds: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    outcome: int
    task: task_pb2.Task | None
    attempt: int = 0
    retry_after: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    task_id: str
    dispatch_gen: int
    subject: str
    payload: bytes


class NotFailedError(CharaiError):
    """RetryTask on a task that is not FAILED (only failed tasks are re-run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_NOT_FAILED"


def _median(values: list[int]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2


class _TaskRow(NamedTuple):
    """The columns of ``tasks`` that decisions are made from (``_TASK_COLUMNS``, in order)."""

    task: bytes
    tenant: str
    attempt: int
    lease_expires: int | None
    dispatch_gen: int
    last_seq: int
    next_attempt_time: int | None
    status: int


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


@dataclasses.dataclass(slots=True)
class _Unit:
    """One write transaction and the task changes it will commit."""

    tx: Tx
    saves: list[_Save] = dataclasses.field(default_factory=list)
    #: Jobs this unit queued already claimed for the local relay (see ``TaskStore.hand_off``).
    handed: list[OutboxRow] = dataclasses.field(default_factory=list)


class TaskStore:
    """The store's operations (used by the gRPC API and the dispatch loops) over a backend."""

    def __init__(
        self,
        backend: Backend,
        config: StoreConfig,
        on_events: Callable[[list[spb.EventEnvelope]], None] | None = None,
    ) -> None:
        self._db = backend
        self._dialect: Dialect = backend.dialect
        self._config = config
        self._topology = Topology(config.namespace)
        self._on_events = on_events
        self._hand_off: Callable[[list[OutboxRow]], None] | None = None
        self._hand_off_owner = ""

    @property
    def backend(self) -> Backend:
        return self._db

    def describe(self) -> str:
        """``<dialect>: <where>`` for logs (never a password)."""
        return f"{self._dialect.name}: {self._db.describe()}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> TaskStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def hand_off(self, owner: str, take: Callable[[list[OutboxRow]], None]) -> None:
        """Hands the jobs a create queues straight to the local relay ``owner`` after commit.

        Why: the job's outbox row is written claimed for that relay (for
        ``hand_off_claim_seconds``) in the create's own transaction, so the relay publishes it at
        once instead of first claiming it in a transaction of its own (one commit less between a
        create and its pickup). Every relay's claims, the owner's included, leave the row alone
        while that claim lasts (:func:`handed_claimant`: the hand-off is its only publisher, so
        no claim racing the hand-off publishes it twice); if the relay dies or fails to publish
        it, the claim expires and any relay publishes it. ``take`` is called right after commit,
        possibly from the database thread.
        """
        self._hand_off_owner = owner
        self._hand_off = take

    # -- units of work -----------------------------------------------------------------------
    async def _write(self, op: Callable[[_Unit], Coroutine[Any, Any, T]]) -> T:
        """Runs ``op`` in one transaction, appends its events last, publishes them after commit."""
        envelopes: list[spb.EventEnvelope] = []

        handed: list[OutboxRow] = []

        async def body(tx: Tx) -> T:
            envelopes.clear()  # a retried transaction starts over
            handed.clear()
            unit = _Unit(tx)
            result = await op(unit)
            envelopes.extend(await self._append_events(unit))
            handed.extend(unit.handed)
            return result

        def committed() -> None:
            if handed and self._hand_off is not None:
                self._hand_off(list(handed))
            if envelopes and self._on_events is not None:
                self._on_events(list(envelopes))

        return await self._db.write(body, committed)

    async def _append_events(self, unit: _Unit) -> list[spb.EventEnvelope]:
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
            envelope.prev_sequence = last.get(task_id, save.prev_seq)
            envelopes.append(envelope)
            last[task_id] = seq
        return envelopes

    async def _append_event(self, tx: Tx, save: _Save) -> int:
        task = save.envelope.event.task
        event_args = (task.id, save.tenant, int(task.type), save.event_type, save.now, save.blob)
        if self._dialect.append_event is not None:
            seq = await tx.fetchval(
                self._dialect.append_event,
                *event_args,
                int(task.status),
                task.attempt,
                save.lease_expires,
                save.next_attempt_time,
            )
            return int(seq)
        seq = await tx.fetchval(
            "INSERT INTO events (task_id, tenant, task_type, type, time, task)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
            *event_args,
        )
        await tx.execute(
            "UPDATE tasks SET status = ?, attempt = ?, update_time = ?, lease_expires = ?,"
            " next_attempt_time = ?, last_seq = ?, task = ? WHERE id = ?",
            int(task.status),
            task.attempt,
            save.now,
            save.lease_expires,
            save.next_attempt_time,
            int(seq),
            save.blob,
            task.id,
        )
        return int(seq)

    # -- helpers -----------------------------------------------------------------------------
    async def _load(
        self, tx: Tx, task_id: str, tenant: str | None = None, *, lock: bool = True
    ) -> tuple[task_pb2.Task, _TaskRow]:
        """The task and its row; ``lock``: the transaction is about to change it."""
        suffix = self._dialect.for_update if lock else ""
        raw = await tx.fetchrow(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?{suffix}", task_id)
        if raw is None:
            raise NotFoundError(f"task {task_id} not found", id=task_id)
        row = _TaskRow(*raw)
        if tenant is not None and row.tenant != tenant:
            raise NotFoundError(f"task {task_id} not found", id=task_id)
        return task_pb2.Task.FromString(row.task), row

    def _save(
        self,
        unit: _Unit,
        task: task_pb2.Task,
        tenant: str,
        event_type: int,
        now: int,
        prev_seq: int,
        *,
        lease_expires: int | None = None,
        next_attempt_time: int | None = None,
    ) -> None:
        """Records the task as it is now; its row and its event are written at the end of the
        unit (:meth:`_append_events`), so an operation must not read the row back after this."""
        task.update_time.FromMicroseconds(now)
        task.queue_position = 0
        envelope = spb.EventEnvelope(tenant=tenant)
        envelope.event.type = event_type  # type: ignore[assignment]
        envelope.event.time.FromMicroseconds(now)
        snapshot = envelope.event.task
        snapshot.CopyFrom(task)
        unit.saves.append(
            _Save(
                envelope=envelope,
                blob=snapshot.SerializeToString(),
                tenant=tenant,
                event_type=event_type,
                now=now,
                prev_seq=prev_seq,
                lease_expires=lease_expires,
                next_attempt_time=next_attempt_time,
            )
        )

    def _transition(
        self,
        unit: _Unit,
        task: task_pb2.Task,
        row: _TaskRow,
        transition: Transition,
        now: int,
        **kwargs: Any,
    ) -> None:
        task.status = states.apply(Status(task.status), transition)  # type: ignore[assignment]
        self._save(unit, task, row.tenant, EVENT_TYPES[transition], now, int(row.last_seq), **kwargs)

    async def _position(self, tx: Tx, task: task_pb2.Task) -> None:
        """Fills ``queue_position``: 1 + the queued tasks of its type ahead of it (higher
        priority, or the same priority and created earlier), counted in SQL, so it is right
        whichever replica answers.

        With lane counters (SQLite) this does not count the queue: the queued tasks of the lanes
        at or above the task's priority (counters) minus those queued behind it in its lane (an
        index range, empty for a task just created). Only a task deep in a long queue is counted
        from the front instead, over the tasks ahead of it in its lane.
        """
        if task.status != task_pb2.TASK_STATUS_QUEUED:
            task.queue_position = 0
            return
        created = task.create_time.ToMicroseconds()
        if self._dialect.lane_counts:
            await self._position_from_counters(tx, task, created)
            return
        ahead = await tx.fetchval(
            "SELECT COUNT(*) FROM tasks WHERE type = ? AND status = ? AND (priority > ? OR"
            " (priority = ? AND (create_time < ? OR (create_time = ? AND id < ?))))",
            int(task.type),
            int(Status.QUEUED),
            int(task.priority),
            int(task.priority),
            created,
            created,
            task.id,
        )
        task.queue_position = int(ahead) + 1

    async def _position_from_counters(self, tx: Tx, task: task_pb2.Task, created: int) -> None:
        kind, priority, queued = int(task.type), int(task.priority), int(Status.QUEUED)
        row = await tx.fetchrow(
            "SELECT (SELECT COALESCE(SUM(queued), 0) FROM lane_counts WHERE type = ? AND priority >= ?),"
            " (SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE type = ? AND status = ? AND priority = ?"
            " AND (create_time, id) > (?, ?) LIMIT ?))",
            kind,
            priority,
            kind,
            queued,
            priority,
            created,
            task.id,
            BEHIND_SCAN,
        )
        assert row is not None
        from_here, behind = int(row[0]), int(row[1])
        if behind < BEHIND_SCAN:
            task.queue_position = max(1, from_here - behind)
            return
        row = await tx.fetchrow(
            "SELECT (SELECT COALESCE(SUM(queued), 0) FROM lane_counts WHERE type = ? AND priority > ?),"
            " (SELECT COUNT(*) FROM tasks WHERE type = ? AND status = ? AND priority = ?"
            " AND (create_time, id) < (?, ?))",
            kind,
            priority,
            kind,
            queued,
            priority,
            created,
            task.id,
        )
        assert row is not None
        task.queue_position = int(row[0]) + int(row[1]) + 1

    def _metadata_filter(
        self, column: str, tenant: str, metadata: Mapping[str, str]
    ) -> tuple[str, list[Any]]:
        """SQL (starting with ``AND``) keeping rows whose task ``column`` has every pair."""
        pairs = dict(sorted(dict(metadata).items()))
        if not pairs:
            return "", []
        if self._dialect.metadata_json:
            document = json.dumps(pairs, separators=(",", ":"))
            if column == "id":
                return "AND metadata @> ?::jsonb", [document]
            return (
                f"AND {column} IN (SELECT id FROM tasks WHERE tenant = ? AND metadata @> ?::jsonb)",
                [tenant, document],
            )
        parts: list[str] = []
        args: list[Any] = []
        for key, value in pairs.items():
            parts.append(
                f"AND {column} IN (SELECT task_id FROM task_metadata"
                " WHERE tenant = ? AND key = ? AND value = ?)"
            )
            args += [tenant, key, value]
        return " ".join(parts), args

    # -- client operations -------------------------------------------------------------------
    async def create(
        self, tenant: str, req: task_service_pb2.CreateTaskRequest, traceparent: str = ""
    ) -> tuple[task_pb2.Task, bool]:
        """The new task (and True), or the one this ``request_id`` already created (and False).

        ``traceparent`` (W3C trace context of the creating call) travels with the job.
        """
        return await self._write(lambda unit: self._create(unit, tenant, req, traceparent))

    async def _create(
        self, unit: _Unit, tenant: str, req: task_service_pb2.CreateTaskRequest, traceparent: str = ""
    ) -> tuple[task_pb2.Task, bool]:
        tx = unit.tx
        if req.request_id:
            existing = await self._by_request_id(tx, tenant, req)
            if existing is not None:
                return existing, False
        now = now_us()
        priority = req.priority or task_pb2.PRIORITY_NORMAL
        task = task_pb2.Task(
            id=f"task_{uuid.uuid4().hex}",
            type=req.type,
            priority=priority,
            status=task_pb2.TASK_STATUS_QUEUED,
            progress=states.PROGRESS_QUEUED,
            stage=Stage.QUEUED,
            metadata=fill_metadata(req),
            max_attempts=self._config.max_attempts,
            request_id=req.request_id,
        )
        if req.WhichOneof("payload") == "image":
            task.image.CopyFrom(req.image)
        else:
            task.tts.CopyFrom(req.tts)
        task.create_time.FromMicroseconds(now)
        task.update_time.FromMicroseconds(now)
        blob = task.SerializeToString()
        columns = "id, tenant, request_id, type, priority, status, attempt, max_attempts,"
        columns += " create_time, update_time, dispatch_gen, task"
        values = "?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 1, ?"
        args: list[Any] = [
            task.id,
            tenant,
            req.request_id or None,
            int(task.type),
            int(priority),
            int(task.status),
            task.max_attempts,
            now,
            now,
            blob,
        ]
        if self._dialect.metadata_json:
            columns += ", metadata"
            values += ", ?::jsonb"
            args.append(json.dumps(dict(task.metadata), separators=(",", ":")))
        # A concurrent create with the same request_id (another replica, a retried call) makes
        # this insert do nothing; that task is then the answer.
        inserted = await tx.fetchval(
            f"INSERT INTO tasks ({columns}) VALUES ({values})"
            " ON CONFLICT (tenant, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING id",
            *args,
        )
        if inserted is None:
            existing = await self._by_request_id(tx, tenant, req)
            if existing is None:  # pragma: no cover - the conflicting row is committed by now
                raise RuntimeError("request_id conflict without a task")
            return existing, False
        if not self._dialect.metadata_json:
            await tx.executemany(
                "INSERT INTO task_metadata (task_id, tenant, key, value) VALUES (?, ?, ?, ?)",
                [(task.id, tenant, k, v) for k, v in task.metadata.items()],
            )
        self._save(unit, task, tenant, task_pb2.TASK_EVENT_TYPE_QUEUED, now, 0)
        await self._enqueue_dispatch(tx, task, 1, now, traceparent, unit=unit)
        await self._position(tx, task)
        return task, True

    async def _by_request_id(
        self, tx: Tx, tenant: str, req: task_service_pb2.CreateTaskRequest
    ) -> task_pb2.Task | None:
        row = await tx.fetchrow(
            "SELECT id FROM tasks WHERE tenant = ? AND request_id = ?", tenant, req.request_id
        )
        if row is None:
            return None
        existing, _ = await self._load(tx, row[0], lock=False)
        if existing.type != req.type:
            raise RequestInvalidError(
                [Violation("request_id", "was already used for a task of another type")]
            )
        await self._position(tx, existing)
        return existing

    async def _enqueue_dispatch(
        self,
        tx: Tx,
        task: task_pb2.Task,
        gen: int,
        now: int,
        traceparent: str = "",
        *,
        unit: _Unit | None = None,
    ) -> None:
        """Queues the task's job in the outbox; with ``unit`` and a relay to hand it to
        (:meth:`hand_off`), claimed by that relay and handed over after commit."""
        job = spb.Job(
            task_id=task.id, dispatch_gen=gen, type=task.type, priority=task.priority, traceparent=traceparent
        )
        subject = self._topology.job_subject(task.type, task.priority)
        payload = job.SerializeToString()
        if unit is None or self._hand_off is None:
            await tx.execute(
                "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created)"
                " VALUES (?, ?, ?, ?, ?)",
                task.id,
                gen,
                subject,
                payload,
                now,
            )
            return
        row_id = await tx.fetchval(
            "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created, claimed_by, claimed_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            task.id,
            gen,
            subject,
            payload,
            now,
            handed_claimant(self._hand_off_owner),
            now + int(self._config.hand_off_claim_seconds * 1e6),
        )
        unit.handed.append(OutboxRow(int(row_id), task.id, gen, subject, payload))

    async def get(self, tenant: str, task_id: str) -> task_pb2.Task:
        async def body(tx: Tx) -> task_pb2.Task:
            task, _ = await self._load(tx, task_id, tenant, lock=False)
            await self._position(tx, task)
            return task

        return await self._db.read(body)

    async def list_tasks(
        self, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        return await self._db.read(lambda tx: self._list_tasks(tx, tenant, req))

    async def _list_tasks(
        self, tx: Tx, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        sql = ["SELECT task FROM tasks WHERE tenant = ?"]
        args: list[Any] = [tenant]
        sql_filter, filter_args = self._metadata_filter("id", tenant, req.metadata)
        sql.append(sql_filter)
        args += filter_args
        if req.type:
            sql.append("AND type = ?")
            args.append(int(req.type))
        if req.status:
            sql.append("AND status = ?")
            args.append(int(req.status))
        if req.page_token:
            created, last_id = _decode_token(req.page_token)
            sql.append("AND (create_time < ? OR (create_time = ? AND id < ?))")
            args += [created, created, last_id]
        size = req.page_size or DEFAULT_PAGE
        sql.append("ORDER BY create_time DESC, id DESC LIMIT ?")
        args.append(size + 1)
        rows = await tx.fetch(" ".join(sql), *args)
        tasks = [task_pb2.Task.FromString(r[0]) for r in rows[:size]]
        for task in tasks:
            await self._position(tx, task)
        token = ""
        if len(rows) > size:
            last = tasks[-1]
            token = _encode_token(last.create_time.ToMicroseconds(), last.id)
        return tasks, token

    async def cancel(self, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        """Cancels the task; returns it and whether a worker was running it."""
        return await self._write(lambda unit: self._cancel(unit, tenant, task_id))

    async def _cancel(self, unit: _Unit, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        task, row = await self._load(unit.tx, task_id, tenant)
        status = Status(task.status)
        if status.terminal:
            return task, False
        now = now_us()
        task.stage = Stage.CANCELLED
        task.end_time.FromMicroseconds(now)
        task.ClearField("next_attempt_time")
        self._transition(unit, task, row, Transition.CANCEL, now)
        return task, status is Status.RUNNING

    async def list_events(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        """Events after ``req.after_sequence`` in sequence order, and the head sequence.

        The head is read *before* the events: every event up to it is committed (sequence order is
        commit order), so all of those that match are in the answer (unless ``limit`` cut it) and
        a watcher may move its cursor to the head.
        """
        return await self._db.read(lambda tx: self._list_events(tx, req))

    async def _list_events(self, tx: Tx, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        limit = min(req.limit or 500, 5000)
        head = int(await tx.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events"))
        if req.task_id:
            rows = await tx.fetch(
                "SELECT seq, type, time, task FROM events WHERE task_id = ? AND tenant = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                req.task_id,
                req.tenant,
                req.after_sequence,
                limit,
            )
        else:
            sql_filter, filter_args = self._metadata_filter("task_id", req.tenant, req.metadata)
            type_sql = "AND task_type = ?" if req.type else ""
            args: list[Any] = [req.tenant, req.after_sequence, *filter_args]
            if req.type:
                args.append(int(req.type))
            rows = await tx.fetch(
                "SELECT seq, type, time, task FROM events WHERE tenant = ? AND seq > ?"
                f" {sql_filter} {type_sql} ORDER BY seq LIMIT ?",
                *args,
                limit,
            )
        events = []
        for seq, etype, etime, blob in rows:
            event = task_pb2.TaskEvent(sequence=seq, type=etype, task=task_pb2.Task.FromString(blob))
            event.time.FromMicroseconds(etime)
            events.append(event)
        return events, head

    # -- worker operations -------------------------------------------------------------------
    async def claim(self, task_id: str, dispatch_gen: int, worker_id: str) -> Claim:
        return await self._write(lambda unit: self._claim(unit, task_id, dispatch_gen, worker_id))

    async def _claim(self, unit: _Unit, task_id: str, dispatch_gen: int, worker_id: str) -> Claim:
        tx = unit.tx
        try:
            task, row = await self._load(tx, task_id)
        except NotFoundError:
            return Claim(spb.CLAIM_OUTCOME_DONE, None)
        now = now_us()
        status = Status(task.status)
        if status.terminal:
            return Claim(spb.CLAIM_OUTCOME_DONE, task)
        if status is Status.QUEUED:
            next_at = row.next_attempt_time
            if next_at is not None and next_at > now:
                return Claim(spb.CLAIM_OUTCOME_DEFER, task, retry_after=(next_at - now) / 1e6)
            if task.attempt >= task.max_attempts:
                self._fail_now(unit, task, row, ErrorKind.WORKER_LOST, "no attempts left", now)
                return Claim(spb.CLAIM_OUTCOME_DONE, task)
        else:  # RUNNING
            lease = row.lease_expires or 0
            if lease > now:
                return Claim(spb.CLAIM_OUTCOME_DEFER, task, retry_after=(lease - now) / 1e6)
            # The attempt that held the task stopped reporting: its worker is gone.
            delay = self._config.retry.decide(ErrorKind.WORKER_LOST, self._run_attempt(task))
            if delay is None:
                message = f"the worker running attempt {task.attempt} was lost and no attempts are left"
                self._fail_now(unit, task, row, ErrorKind.WORKER_LOST, message, now)
                return Claim(spb.CLAIM_OUTCOME_DONE, task)
            task.error.CopyFrom(
                task_pb2.TaskError(
                    code=ErrorKind.WORKER_LOST,  # type: ignore[arg-type]
                    message=f"the worker running attempt {task.attempt} was lost",
                    retryable=True,
                )
            )
        task.attempt += 1
        task.progress = states.PROGRESS_STARTED
        task.stage = Stage.STARTING
        task.ClearField("next_attempt_time")
        if not task.HasField("start_time"):
            task.start_time.FromMicroseconds(now)
        lease_expires = now + int(self._config.lease_seconds * 1e6)
        await tx.execute("UPDATE tasks SET lease_owner = ? WHERE id = ?", worker_id, task_id)
        self._transition(unit, task, row, Transition.START, now, lease_expires=lease_expires)
        return Claim(spb.CLAIM_OUTCOME_RUN, task, attempt=task.attempt)

    def _fail_now(
        self, unit: _Unit, task: task_pb2.Task, row: _TaskRow, kind: ErrorKind, message: str, now: int
    ) -> None:
        task.error.CopyFrom(task_pb2.TaskError(code=kind, message=message, retryable=False))  # type: ignore[arg-type]
        task.stage = Stage.FAILED
        task.end_time.FromMicroseconds(now)
        task.ClearField("next_attempt_time")
        self._transition(unit, task, row, Transition.FAIL, now)

    async def _fenced(self, tx: Tx, task_id: str, attempt: int) -> tuple[task_pb2.Task, _TaskRow]:
        task, row = await self._load(tx, task_id)
        status = Status(task.status)
        if status.terminal:
            raise TaskEndedError(f"task {task_id} already {status.seed_name}", status=status.seed_name)
        if not states.fenced(task.attempt, attempt, status):
            raise StaleAttemptError(
                f"attempt {attempt} of task {task_id} no longer holds it (current attempt {task.attempt})"
            )
        return task, row

    async def progress(self, task_id: str, attempt: int, progress: int, stage: str) -> int:
        return await self._write(lambda unit: self._progress(unit, task_id, attempt, progress, stage))

    async def _progress(self, unit: _Unit, task_id: str, attempt: int, progress: int, stage: str) -> int:
        task, row = await self._fenced(unit.tx, task_id, attempt)
        now = now_us()
        lease_expires = now + int(self._config.lease_seconds * 1e6)
        new_progress = states.clamp_progress(task.progress, progress)
        new_stage = stage[:32] or task.stage
        if new_progress == task.progress and new_stage == task.stage:
            await unit.tx.execute("UPDATE tasks SET lease_expires = ? WHERE id = ?", lease_expires, task_id)
            return int(task.status)
        task.progress = new_progress
        task.stage = new_stage
        self._transition(unit, task, row, Transition.PROGRESS, now, lease_expires=lease_expires)
        return int(task.status)

    async def complete(self, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        return await self._write(lambda unit: self._complete(unit, req))

    async def _complete(self, unit: _Unit, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        task, row = await self._load(unit.tx, req.task_id)
        if task.status == task_pb2.TASK_STATUS_COMPLETED and task.attempt == req.attempt:
            return task  # a repeated completion of the same attempt (e.g. the ack was lost)
        task, row = await self._fenced(unit.tx, req.task_id, req.attempt)
        now = now_us()
        if req.progress > 0:
            # The attempt's last progress, sent with the result instead of a report of its own:
            # recorded first (its own event) when it is news, in this same transaction.
            progress = states.clamp_progress(task.progress, req.progress)
            stage = req.stage[:32] or task.stage
            if (progress, stage) != (task.progress, task.stage):
                task.progress, task.stage = progress, stage
                self._transition(unit, task, row, Transition.PROGRESS, now)
        if req.WhichOneof("result") == "image_result":
            task.image_result.CopyFrom(req.image_result)
        else:
            task.tts_result.CopyFrom(req.tts_result)
        task.progress = states.PROGRESS_DONE
        task.stage = Stage.COMPLETED
        task.ClearField("error")
        task.end_time.FromMicroseconds(now)
        self._transition(unit, task, row, Transition.COMPLETE, now)
        return task

    async def fail(self, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        return await self._write(lambda unit: self._fail(unit, req))

    async def _fail(self, unit: _Unit, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        try:
            task, row = await self._fenced(unit.tx, req.task_id, req.attempt)
        except (TaskEndedError, StaleAttemptError):
            task, _ = await self._load(unit.tx, req.task_id)
            return spb.FAIL_OUTCOME_IGNORED, 0.0, task
        now = now_us()
        kind = (
            ErrorKind(req.error.code)
            if req.error.code in ErrorKind._value2member_map_
            else ErrorKind.INTERNAL
        )
        delay = self._config.retry.decide(kind, self._run_attempt(task), req.retry_after_seconds or None)
        error = task_pb2.TaskError()
        error.CopyFrom(req.error)
        error.retryable = delay is not None
        task.error.CopyFrom(error)
        if delay is None:
            task.stage = Stage.FAILED
            task.end_time.FromMicroseconds(now)
            self._transition(unit, task, row, Transition.FAIL, now)
            return spb.FAIL_OUTCOME_FAILED, 0.0, task
        next_at = now + int(delay * 1e6)
        task.progress = states.PROGRESS_QUEUED
        task.stage = Stage.WAITING_RETRY
        task.next_attempt_time.FromMicroseconds(next_at)
        self._transition(unit, task, row, Transition.RETRY, now, next_attempt_time=next_at)
        return spb.FAIL_OUTCOME_RETRY, delay, task

    def _run_attempt(self, task: task_pb2.Task) -> int:
        """The attempt's number within the current run: a task re-run by RetryTask keeps
        counting attempts (its history stays readable), but the retry policy judges each run
        from its first attempt, so a re-run gets the whole retry budget again."""
        base = max(0, task.max_attempts - self._config.max_attempts)
        return max(1, task.attempt - base)

    # -- operator operations -----------------------------------------------------------------
    async def retry(self, tenant: str, task_id: str) -> task_pb2.Task:
        """Re-runs a FAILED task (the dead-letter view's action): QUEUED again, error cleared,
        ``max_attempts`` extended by the configured budget, a new dispatch generation and its
        outbox row, and a QUEUED event. Only FAILED: a cancelled task was stopped on purpose,
        a completed one has its result."""
        return await self._write(lambda unit: self._retry(unit, tenant, task_id))

    async def _retry(self, unit: _Unit, tenant: str, task_id: str) -> task_pb2.Task:
        tx = unit.tx
        task, row = await self._load(tx, task_id, tenant)
        if task.status != task_pb2.TASK_STATUS_FAILED:
            raise NotFailedError(
                f"task {task_id} is {Status(task.status).seed_name}; only failed tasks can be retried",
                status=Status(task.status).seed_name,
            )
        now = now_us()
        gen = int(row.dispatch_gen) + 1
        # Deliberately outside the state machine: terminal states are final for the pipeline;
        # an operator's re-run is the one way out of FAILED, and it happens only here.
        task.status = task_pb2.TASK_STATUS_QUEUED
        task.progress = states.PROGRESS_QUEUED
        task.stage = Stage.QUEUED
        task.max_attempts = task.attempt + self._config.max_attempts
        for field in ("error", "end_time", "next_attempt_time"):
            task.ClearField(field)  # type: ignore[arg-type]
        await tx.execute(
            "UPDATE tasks SET dispatch_gen = ?, dispatched_at = NULL, max_attempts = ?, lease_owner = NULL"
            " WHERE id = ?",
            gen,
            task.max_attempts,
            task_id,
        )
        self._save(unit, task, row.tenant, task_pb2.TASK_EVENT_TYPE_QUEUED, now, int(row.last_seq))
        await self._enqueue_dispatch(tx, task, gen, now)
        return task

    async def queue_stats(self) -> tuple[list[task_service_pb2.LaneStats], int]:
        """Every lane's depth, retry wait, in-flight, throughput and median wait, and the outbox
        backlog: aggregates over the shared database, so every replica answers the same.

        Median wait is creation to *first* start (a retried attempt's wait would include its
        back-off) over tasks first started in the last :data:`WAIT_WINDOW_S`; the samples are
        selected by SQL and the median taken here, since SQLite has no percentile function.
        """
        return await self._db.read(self._queue_stats)

    async def _queue_stats(self, tx: Tx) -> tuple[list[task_service_pb2.LaneStats], int]:
        now = now_us()
        lanes: dict[tuple[int, int], task_service_pb2.LaneStats] = {
            (t, p): task_service_pb2.LaneStats(type=t, priority=p)
            for t in LANE_TYPES
            for p in LANE_PRIORITIES
        }

        def lane(t: int, p: int) -> task_service_pb2.LaneStats:
            key = (t, p)
            if key not in lanes:  # a type or priority this build does not list: still shown
                lanes[key] = task_service_pb2.LaneStats(type=t, priority=p)  # type: ignore[arg-type]
            return lanes[key]

        rows = await tx.fetch(
            "SELECT type, priority,"
            " SUM(CASE WHEN status = ? AND (next_attempt_time IS NULL OR next_attempt_time <= ?)"
            " THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status = ? AND next_attempt_time > ? THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status = ? THEN 1 ELSE 0 END)"
            " FROM tasks WHERE status IN (?, ?) GROUP BY type, priority",
            int(Status.QUEUED),
            now,
            int(Status.QUEUED),
            now,
            int(Status.RUNNING),
            int(Status.QUEUED),
            int(Status.RUNNING),
        )
        for t, p, depth, waiting, running in rows:
            stats = lane(int(t), int(p))
            stats.depth, stats.waiting_retry, stats.in_flight = int(depth), int(waiting), int(running)
        rows = await tx.fetch(
            "SELECT type, priority, COUNT(*) FROM tasks WHERE status = ? AND update_time >= ?"
            " GROUP BY type, priority",
            int(Status.COMPLETED),
            now - int(THROUGHPUT_WINDOW_S * 1e6),
        )
        for t, p, done in rows:
            stats = lane(int(t), int(p))
            stats.completed_last_minute = int(done)
            stats.throughput_per_second = int(done) / THROUGHPUT_WINDOW_S
        rows = await tx.fetch(
            "SELECT t.type, t.priority, e.time - t.create_time FROM events e JOIN tasks t ON t.id = e.task_id"
            " WHERE e.seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - ? AND e.type = ? AND e.time >= ?"
            " AND NOT EXISTS (SELECT 1 FROM events p WHERE p.task_id = e.task_id AND p.type = ?"
            " AND p.seq < e.seq)",
            WAIT_SCAN_EVENTS,
            task_pb2.TASK_EVENT_TYPE_STARTED,
            now - int(WAIT_WINDOW_S * 1e6),
            task_pb2.TASK_EVENT_TYPE_STARTED,
        )
        waits: dict[tuple[int, int], list[int]] = {}
        for t, p, wait in rows:
            waits.setdefault((int(t), int(p)), []).append(max(0, int(wait)))
        for (t, p), samples in waits.items():
            stats = lane(t, p)
            stats.median_wait_seconds = _median(samples) / 1e6
            stats.wait_samples = len(samples)
        backlog = int(await tx.fetchval("SELECT COUNT(*) FROM outbox"))
        ordered = sorted(lanes.values(), key=lambda s: (s.type, -s.priority))
        return ordered, backlog

    # -- outbox and sweeper ------------------------------------------------------------------
    async def pending_dispatches(self, limit: int = 256) -> list[OutboxRow]:
        """Every job not yet confirmed published, oldest first, claimed or not (a read: for
        checks and tests; relays use :meth:`claim_dispatches`)."""

        async def body(tx: Tx) -> list[OutboxRow]:
            rows = await tx.fetch(
                "SELECT id, task_id, dispatch_gen, subject, payload FROM outbox ORDER BY id LIMIT ?", limit
            )
            return [OutboxRow(int(r[0]), r[1], int(r[2]), r[3], bytes(r[4])) for r in rows]

        return await self._db.read(body)

    async def claim_dispatches(
        self, owner: str, limit: int = 256, sent: Sequence[tuple[OutboxRow, int]] = ()
    ) -> list[OutboxRow]:
        """Claims up to ``limit`` unpublished jobs for ``owner`` (a relay), oldest first.

        A row is claimable when nobody holds it, its claim expired, or ``owner`` already holds it
        (so a relay retries its own failures at once). ``SKIP LOCKED``: two replicas claiming at
        the same moment take different rows instead of waiting for each other.

        ``sent``: the jobs ``owner`` published since its previous claim, with their JetStream
        sequences. They are recorded first, in the same transaction (see :meth:`mark_dispatched`),
        so a relay writes once per batch rather than twice, and its own published rows are gone
        before it claims again. A relay that dies before this commits leaves them claimed: they
        are re-published when the claims expire, and JetStream drops the repeats (same
        ``Nats-Msg-Id``).
        """

        async def body(tx: Tx) -> list[OutboxRow]:
            if sent:
                await self._mark(tx, sent)
            now = now_us()
            until = now + int(self._config.outbox_claim_seconds * 1e6)
            rows = await tx.fetch(
                "UPDATE outbox SET claimed_by = ?, claimed_until = ? WHERE id IN ("
                "SELECT id FROM outbox WHERE claimed_until IS NULL OR claimed_until < ? OR claimed_by = ?"
                f" ORDER BY id LIMIT ?{self._dialect.skip_locked})"
                " RETURNING id, task_id, dispatch_gen, subject, payload",
                owner,
                until,
                now,
                owner,
                limit,
            )
            found = [OutboxRow(int(r[0]), r[1], int(r[2]), r[3], bytes(r[4])) for r in rows]
            return sorted(found, key=lambda r: r.id)

        return await self._db.write(body)

    async def release_dispatches(self, owner: str, sent: Sequence[tuple[OutboxRow, int]] = ()) -> None:
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

    async def mark_dispatched(self, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        """Records the JetStream sequence of each published job and drops its outbox row."""
        await self._db.write(lambda tx: self._mark(tx, sent))

    async def _mark(self, tx: Tx, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        now = now_us()
        # One order for every writer of these rows, so two relays cannot deadlock.
        ordered = sorted(sent, key=lambda s: (s[0].task_id, s[0].id))
        await tx.executemany("DELETE FROM outbox WHERE id = ?", [(r.id,) for r, _ in ordered])
        await tx.executemany(
            "UPDATE tasks SET stream_seq = ?, dispatched_at = ? WHERE id = ? AND dispatch_gen = ?",
            [(seq, now, r.task_id, r.dispatch_gen) for r, seq in ordered],
        )

    async def stale_dispatches(
        self, older_than_s: float, limit: int = 200
    ) -> list[tuple[str, int, int | None]]:
        """Claims unfinished tasks whose job was published long ago: (task id, dispatch gen,
        stream seq).

        The sweeper checks each job is still in the stream and re-dispatches those that are not.
        Claiming moves ``dispatched_at`` to now, so another replica's sweeper leaves these tasks
        alone for ``older_than_s`` (and so does the next sweep when the job is still there).
        """

        async def body(tx: Tx) -> list[tuple[str, int, int | None]]:
            now = now_us()
            cutoff = now - int(older_than_s * 1e6)
            rows = await tx.fetch(
                "UPDATE tasks SET dispatched_at = ? WHERE id IN ("
                "SELECT id FROM tasks WHERE status IN (?, ?)"
                " AND dispatched_at IS NOT NULL AND dispatched_at < ?"
                " AND (status = ? OR lease_expires < ?)"
                " AND (next_attempt_time IS NULL OR next_attempt_time < ?)"
                " AND id NOT IN (SELECT task_id FROM outbox)"
                f" ORDER BY dispatched_at LIMIT ?{self._dialect.skip_locked})"
                " RETURNING id, dispatch_gen, stream_seq",
                now,
                int(Status.QUEUED),
                int(Status.RUNNING),
                cutoff,
                int(Status.QUEUED),
                now,
                now,
                limit,
            )
            return [(r[0], int(r[1]), None if r[2] is None else int(r[2])) for r in rows]

        return await self._db.write(body)

    async def touch_dispatch(self, task_ids: Iterable[str]) -> None:
        """Marks the jobs of these tasks as seen in the stream just now."""
        ids = sorted(task_ids)

        async def body(tx: Tx) -> None:
            now = now_us()
            await tx.executemany("UPDATE tasks SET dispatched_at = ? WHERE id = ?", [(now, i) for i in ids])

        await self._db.write(body)

    async def redispatch(self, task_id: str, seen_gen: int) -> bool:
        """Queues a new job for the task unless it ended or was re-dispatched since ``seen_gen``."""

        async def body(tx: Tx) -> bool:
            task, row = await self._load(tx, task_id)
            if Status(task.status).terminal or int(row.dispatch_gen) != seen_gen:
                return False
            gen = seen_gen + 1
            await tx.execute(
                "UPDATE tasks SET dispatch_gen = ?, dispatched_at = NULL WHERE id = ?", gen, task_id
            )
            await self._enqueue_dispatch(tx, task, gen, now_us())
            return True

        return await self._db.write(body)

    async def tenant_of(self, task_id: str) -> str | None:
        row = await self._db.read(lambda tx: tx.fetchrow("SELECT tenant FROM tasks WHERE id = ?", task_id))
        return None if row is None else str(row[0])


class SqliteStore(TaskStore):
    """The task store on a SQLite file (WAL, synchronous=FULL): the embedded default."""

    def __init__(
        self,
        path: Path,
        config: StoreConfig,
        on_events: Callable[[list[spb.EventEnvelope]], None] | None = None,
    ) -> None:
        super().__init__(SqliteBackend(path), config, on_events)


class PostgresStore(TaskStore):
    """The task store on PostgreSQL: the scale-out backend, shared by several replicas."""

    def __init__(
        self,
        url: str,
        config: StoreConfig,
        on_events: Callable[[list[spb.EventEnvelope]], None] | None = None,
        *,
        password: str | None = None,
        pool_size: int = 10,
    ) -> None:
        super().__init__(PostgresBackend(url, password=password, pool_size=pool_size), config, on_events)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(
    url: str,
    config: StoreConfig,
    on_events: Callable[[list[spb.EventEnvelope]], None] | None = None,
    *,
    password: str | None = None,
    pool_size: int = 10,
) -> TaskStore:
    """The store for a database URL: ``sqlite:///path`` or ``postgresql://…`` (not opened yet)."""
    if is_postgres_url(url):
        return PostgresStore(url, config, on_events, password=password, pool_size=pool_size)
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url[len("sqlite:///") :]), config, on_events)
    raise ValueError("the database URL must start with sqlite:/// or postgresql://")


def _encode_token(created: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created}:{task_id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, task_id = raw.split(":", 1)
        return int(created), task_id
    except (ValueError, UnicodeDecodeError):
        raise RequestInvalidError([Violation("page_token", "is not a token this server issued")]) from None
