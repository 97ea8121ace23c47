"""SQLite task store: tasks, metadata index, append-only event log and outbox.

Every operation is one transaction, run on one dedicated thread (SQLite has one writer anyway),
so event sequences are assigned in commit order. Envelopes of new events are handed, in that same
order, to ``on_events`` from the database thread; the service publishes them after commit.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from charai.core.domain import states
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.domain.states import Stage, Status, Transition
from charai.core.errors import NotFoundError, StaleAttemptError, TaskEndedError
from charai.core.topology import Topology
from charai.core.validation import RequestInvalidError, Violation, fill_metadata
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.schema import MIGRATIONS, SCHEMA_VERSION_TABLE
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


def now_us() -> int:
    return time.time_ns() // 1000


def tenant_token(tenant: str) -> str:
    """A subject-safe token for a tenant name."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    max_attempts: int = 6
    lease_seconds: float = 30.0
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    namespace: str = "charai"


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


class SqliteStore:
    """The task store on SQLite (WAL, synchronous=FULL)."""

    def __init__(
        self,
        path: Path,
        config: StoreConfig,
        on_events: Callable[[list[spb.EventEnvelope]], None] | None = None,
    ) -> None:
        self._path = path
        self._config = config
        self._topology = Topology(config.namespace)
        self._on_events = on_events
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(SCHEMA_VERSION_TABLE)
        done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql in statements:
                    conn.execute(sql)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (version, description, now_us()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._conn = conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._close_sync)
        self._pool.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None, "store is not open"
        envelopes: list[spb.EventEnvelope] = []
        self._pending = envelopes
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if envelopes and self._on_events is not None:
            self._on_events(envelopes)
        return result

    # -- helpers -----------------------------------------------------------------------------
    def _load(
        self, conn: sqlite3.Connection, task_id: str, tenant: str | None = None
    ) -> tuple[task_pb2.Task, Any]:
        row = conn.execute(
            "SELECT task, tenant, attempt, lease_expires, dispatch_gen, last_seq, next_attempt_time, status"
            " FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            raise NotFoundError(f"task {task_id} not found", id=task_id)
        return task_pb2.Task.FromString(row[0]), row

    def _save(
        self,
        conn: sqlite3.Connection,
        task: task_pb2.Task,
        tenant: str,
        event_type: int,
        now: int,
        prev_seq: int,
        *,
        lease_expires: int | None = None,
        next_attempt_time: int | None = None,
    ) -> task_pb2.TaskEvent:
        task.update_time.FromMicroseconds(now)
        task.queue_position = 0
        blob = task.SerializeToString()
        cur = conn.execute(
            "INSERT INTO events (task_id, tenant, task_type, type, time, task) VALUES (?, ?, ?, ?, ?, ?)",
            (task.id, tenant, task.type, event_type, now, blob),
        )
        seq = int(cur.lastrowid or 0)
        conn.execute(
            "UPDATE tasks SET status = ?, attempt = ?, update_time = ?, lease_expires = ?,"
            " next_attempt_time = ?, last_seq = ?, task = ? WHERE id = ?",
            (task.status, task.attempt, now, lease_expires, next_attempt_time, seq, blob, task.id),
        )
        event = task_pb2.TaskEvent(sequence=seq, type=event_type, task=task)  # type: ignore[arg-type]
        event.time.FromMicroseconds(now)
        self._pending.append(spb.EventEnvelope(tenant=tenant, prev_sequence=prev_seq, event=event))
        return event

    def _transition(
        self,
        conn: sqlite3.Connection,
        task: task_pb2.Task,
        row: Any,
        transition: Transition,
        now: int,
        **kwargs: Any,
    ) -> task_pb2.TaskEvent:
        task.status = states.apply(Status(task.status), transition)  # type: ignore[assignment]
        return self._save(conn, task, row[1], EVENT_TYPES[transition], now, int(row[5]), **kwargs)

    # -- client operations -------------------------------------------------------------------
    async def create(
        self, tenant: str, req: task_service_pb2.CreateTaskRequest
    ) -> tuple[task_pb2.Task, bool]:
        return await self._run(self._tx, lambda conn: self._create(conn, tenant, req))

    def _create(
        self, conn: sqlite3.Connection, tenant: str, req: task_service_pb2.CreateTaskRequest
    ) -> tuple[task_pb2.Task, bool]:
        if req.request_id:
            row = conn.execute(
                "SELECT id FROM tasks WHERE tenant = ? AND request_id = ?", (tenant, req.request_id)
            ).fetchone()
            if row is not None:
                existing, _ = self._load(conn, row[0])
                if existing.type != req.type:
                    raise RequestInvalidError(
                        [Violation("request_id", "was already used for a task of another type")]
                    )
                self._position(conn, existing)
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
        conn.execute(
            "INSERT INTO tasks (id, tenant, request_id, type, priority, status, attempt, max_attempts,"
            " create_time, update_time, dispatch_gen, task) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 1, ?)",
            (
                task.id,
                tenant,
                req.request_id or None,
                task.type,
                priority,
                task.status,
                task.max_attempts,
                now,
                now,
                blob,
            ),
        )
        conn.executemany(
            "INSERT INTO task_metadata (task_id, tenant, key, value) VALUES (?, ?, ?, ?)",
            [(task.id, tenant, k, v) for k, v in task.metadata.items()],
        )
        self._save(conn, task, tenant, task_pb2.TASK_EVENT_TYPE_QUEUED, now, 0)
        self._enqueue_dispatch(conn, task, 1, now)
        self._position(conn, task)
        return task, True

    def _enqueue_dispatch(self, conn: sqlite3.Connection, task: task_pb2.Task, gen: int, now: int) -> None:
        job = spb.Job(task_id=task.id, dispatch_gen=gen, type=task.type, priority=task.priority)
        conn.execute(
            "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created) VALUES (?, ?, ?, ?, ?)",
            (
                task.id,
                gen,
                self._topology.job_subject(task.type, task.priority),
                job.SerializeToString(),
                now,
            ),
        )

    def _position(self, conn: sqlite3.Connection, task: task_pb2.Task) -> None:
        if task.status != task_pb2.TASK_STATUS_QUEUED:
            task.queue_position = 0
            return
        created = task.create_time.ToMicroseconds()
        (ahead,) = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE type = ? AND status = ? AND (priority > ? OR"
            " (priority = ? AND (create_time < ? OR (create_time = ? AND id < ?))))",
            (task.type, task_pb2.TASK_STATUS_QUEUED, task.priority, task.priority, created, created, task.id),
        ).fetchone()
        task.queue_position = int(ahead) + 1

    async def get(self, tenant: str, task_id: str) -> task_pb2.Task:
        return await self._run(self._get, tenant, task_id)

    def _get(self, tenant: str, task_id: str) -> task_pb2.Task:
        assert self._conn is not None
        task, _ = self._load(self._conn, task_id, tenant)
        self._position(self._conn, task)
        return task

    async def list_tasks(
        self, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        return await self._run(self._list_tasks, tenant, req)

    def _list_tasks(
        self, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        assert self._conn is not None
        sql = ["SELECT task, create_time FROM tasks WHERE tenant = ?"]
        args: list[Any] = [tenant]
        sql_filter, filter_args = _metadata_filter("id", tenant, req.metadata)
        sql.append(sql_filter)
        args += filter_args
        if req.type:
            sql.append("AND type = ?")
            args.append(req.type)
        if req.status:
            sql.append("AND status = ?")
            args.append(req.status)
        if req.page_token:
            created, last_id = _decode_token(req.page_token)
            sql.append("AND (create_time < ? OR (create_time = ? AND id < ?))")
            args += [created, created, last_id]
        size = req.page_size or DEFAULT_PAGE
        sql.append("ORDER BY create_time DESC, id DESC LIMIT ?")
        args.append(size + 1)
        rows = self._conn.execute(" ".join(sql), args).fetchall()
        tasks = [task_pb2.Task.FromString(r[0]) for r in rows[:size]]
        for task in tasks:
            self._position(self._conn, task)
        token = ""
        if len(rows) > size:
            last = tasks[-1]
            token = _encode_token(last.create_time.ToMicroseconds(), last.id)
        return tasks, token

    async def cancel(self, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        """Cancels the task; returns it and whether a worker was running it."""
        return await self._run(self._tx, lambda conn: self._cancel(conn, tenant, task_id))

    def _cancel(self, conn: sqlite3.Connection, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        task, row = self._load(conn, task_id, tenant)
        status = Status(task.status)
        if status.terminal:
            return task, False
        now = now_us()
        task.stage = Stage.CANCELLED
        task.end_time.FromMicroseconds(now)
        task.ClearField("next_attempt_time")
        self._transition(conn, task, row, Transition.CANCEL, now)
        return task, status is Status.RUNNING

    async def list_events(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        return await self._run(self._list_events, req)

    def _list_events(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        assert self._conn is not None
        limit = min(req.limit or 500, 5000)
        (head,) = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        if req.task_id:
            rows = self._conn.execute(
                "SELECT seq, type, time, task FROM events WHERE task_id = ? AND tenant = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (req.task_id, req.tenant, req.after_sequence, limit),
            ).fetchall()
        else:
            sql_filter, filter_args = _metadata_filter("task_id", req.tenant, req.metadata)
            type_sql = "AND task_type = ?" if req.type else ""
            args: list[Any] = [req.tenant, req.after_sequence, *filter_args]
            if req.type:
                args.append(req.type)
            rows = self._conn.execute(
                "SELECT seq, type, time, task FROM events WHERE tenant = ? AND seq > ?"
                f" {sql_filter} {type_sql} ORDER BY seq LIMIT ?",
                [*args, limit],
            ).fetchall()
        events = []
        for seq, etype, etime, blob in rows:
            event = task_pb2.TaskEvent(sequence=seq, type=etype, task=task_pb2.Task.FromString(blob))
            event.time.FromMicroseconds(etime)
            events.append(event)
        return events, int(head)

    # -- worker operations -------------------------------------------------------------------
    async def claim(self, task_id: str, dispatch_gen: int, worker_id: str) -> Claim:
        return await self._run(self._tx, lambda conn: self._claim(conn, task_id, dispatch_gen, worker_id))

    def _claim(self, conn: sqlite3.Connection, task_id: str, dispatch_gen: int, worker_id: str) -> Claim:
        try:
            task, row = self._load(conn, task_id)
        except NotFoundError:
            return Claim(spb.CLAIM_OUTCOME_DONE, None)
        now = now_us()
        status = Status(task.status)
        if status.terminal:
            return Claim(spb.CLAIM_OUTCOME_DONE, task)
        if status is Status.QUEUED:
            next_at = row[6]
            if next_at is not None and next_at > now:
                return Claim(spb.CLAIM_OUTCOME_DEFER, task, retry_after=(next_at - now) / 1e6)
            if task.attempt >= task.max_attempts:
                self._fail_now(conn, task, row, ErrorKind.WORKER_LOST, "no attempts left", now)
                return Claim(spb.CLAIM_OUTCOME_DONE, task)
        else:  # RUNNING
            lease = row[3] or 0
            if lease > now:
                return Claim(spb.CLAIM_OUTCOME_DEFER, task, retry_after=(lease - now) / 1e6)
            # The attempt that held the task stopped reporting: its worker is gone.
            delay = self._config.retry.decide(ErrorKind.WORKER_LOST, task.attempt)
            if delay is None:
                message = f"the worker running attempt {task.attempt} was lost and no attempts are left"
                self._fail_now(conn, task, row, ErrorKind.WORKER_LOST, message, now)
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
        conn.execute("UPDATE tasks SET lease_owner = ? WHERE id = ?", (worker_id, task_id))
        self._transition(conn, task, row, Transition.START, now, lease_expires=lease_expires)
        return Claim(spb.CLAIM_OUTCOME_RUN, task, attempt=task.attempt)

    def _fail_now(
        self, conn: sqlite3.Connection, task: task_pb2.Task, row: Any, kind: ErrorKind, message: str, now: int
    ) -> None:
        task.error.CopyFrom(task_pb2.TaskError(code=kind, message=message, retryable=False))  # type: ignore[arg-type]
        task.stage = Stage.FAILED
        task.end_time.FromMicroseconds(now)
        task.ClearField("next_attempt_time")
        self._transition(conn, task, row, Transition.FAIL, now)

    def _fenced(self, conn: sqlite3.Connection, task_id: str, attempt: int) -> tuple[task_pb2.Task, Any]:
        task, row = self._load(conn, task_id)
        status = Status(task.status)
        if status.terminal:
            raise TaskEndedError(f"task {task_id} already {status.seed_name}", status=status.seed_name)
        if not states.fenced(task.attempt, attempt, status):
            raise StaleAttemptError(
                f"attempt {attempt} of task {task_id} no longer holds it (current attempt {task.attempt})"
            )
        return task, row

    async def progress(self, task_id: str, attempt: int, progress: int, stage: str) -> int:
        return await self._run(self._tx, lambda conn: self._progress(conn, task_id, attempt, progress, stage))

    def _progress(
        self, conn: sqlite3.Connection, task_id: str, attempt: int, progress: int, stage: str
    ) -> int:
        task, row = self._fenced(conn, task_id, attempt)
        now = now_us()
        lease_expires = now + int(self._config.lease_seconds * 1e6)
        new_progress = states.clamp_progress(task.progress, progress)
        new_stage = stage[:32] or task.stage
        if new_progress == task.progress and new_stage == task.stage:
            conn.execute("UPDATE tasks SET lease_expires = ? WHERE id = ?", (lease_expires, task_id))
            return int(task.status)
        task.progress = new_progress
        task.stage = new_stage
        self._transition(conn, task, row, Transition.PROGRESS, now, lease_expires=lease_expires)
        return int(task.status)

    async def complete(self, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        return await self._run(self._tx, lambda conn: self._complete(conn, req))

    def _complete(self, conn: sqlite3.Connection, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        task, row = self._load(conn, req.task_id)
        if task.status == task_pb2.TASK_STATUS_COMPLETED and task.attempt == req.attempt:
            return task  # a repeated completion of the same attempt (e.g. the ack was lost)
        task, row = self._fenced(conn, req.task_id, req.attempt)
        now = now_us()
        if req.WhichOneof("result") == "image_result":
            task.image_result.CopyFrom(req.image_result)
        else:
            task.tts_result.CopyFrom(req.tts_result)
        task.progress = states.PROGRESS_DONE
        task.stage = Stage.COMPLETED
        task.ClearField("error")
        task.end_time.FromMicroseconds(now)
        self._transition(conn, task, row, Transition.COMPLETE, now)
        return task

    async def fail(self, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        return await self._run(self._tx, lambda conn: self._fail(conn, req))

    def _fail(self, conn: sqlite3.Connection, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        try:
            task, row = self._fenced(conn, req.task_id, req.attempt)
        except (TaskEndedError, StaleAttemptError):
            task, _ = self._load(conn, req.task_id)
            return spb.FAIL_OUTCOME_IGNORED, 0.0, task
        now = now_us()
        kind = (
            ErrorKind(req.error.code)
            if req.error.code in ErrorKind._value2member_map_
            else ErrorKind.INTERNAL
        )
        delay = self._config.retry.decide(kind, task.attempt, req.retry_after_seconds or None)
        error = task_pb2.TaskError()
        error.CopyFrom(req.error)
        error.retryable = delay is not None
        task.error.CopyFrom(error)
        if delay is None:
            task.stage = Stage.FAILED
            task.end_time.FromMicroseconds(now)
            self._transition(conn, task, row, Transition.FAIL, now)
            return spb.FAIL_OUTCOME_FAILED, 0.0, task
        next_at = now + int(delay * 1e6)
        task.progress = states.PROGRESS_QUEUED
        task.stage = Stage.WAITING_RETRY
        task.next_attempt_time.FromMicroseconds(next_at)
        self._transition(conn, task, row, Transition.RETRY, now, next_attempt_time=next_at)
        return spb.FAIL_OUTCOME_RETRY, delay, task

    # -- outbox and sweeper ------------------------------------------------------------------
    async def pending_dispatches(self, limit: int = 256) -> list[OutboxRow]:
        return await self._run(self._pending_dispatches, limit)

    def _pending_dispatches(self, limit: int) -> list[OutboxRow]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT id, task_id, dispatch_gen, subject, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxRow(*r) for r in rows]

    async def mark_dispatched(self, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        """Records the JetStream sequence of each published job and drops its outbox row."""
        await self._run(self._tx, lambda conn: self._mark_dispatched(conn, sent))

    def _mark_dispatched(self, conn: sqlite3.Connection, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        now = now_us()
        conn.executemany("DELETE FROM outbox WHERE id = ?", [(r.id,) for r, _ in sent])
        conn.executemany(
            "UPDATE tasks SET stream_seq = ?, dispatched_at = ? WHERE id = ? AND dispatch_gen = ?",
            [(seq, now, r.task_id, r.dispatch_gen) for r, seq in sent],
        )

    async def stale_dispatches(
        self, older_than_s: float, limit: int = 200
    ) -> list[tuple[str, int, int | None]]:
        """Unfinished tasks whose job was published long ago: (task id, dispatch gen, stream seq).

        The sweeper checks each job is still in the stream and re-dispatches those that are not.
        """
        return await self._run(self._stale_dispatches, older_than_s, limit)

    def _stale_dispatches(self, older_than_s: float, limit: int) -> list[tuple[str, int, int | None]]:
        assert self._conn is not None
        now = now_us()
        cutoff = now - int(older_than_s * 1e6)
        rows = self._conn.execute(
            "SELECT id, dispatch_gen, stream_seq FROM tasks WHERE status IN (?, ?)"
            " AND dispatched_at IS NOT NULL AND dispatched_at < ?"
            " AND (status = ? OR lease_expires < ?)"
            " AND (next_attempt_time IS NULL OR next_attempt_time < ?)"
            " AND id NOT IN (SELECT task_id FROM outbox) ORDER BY dispatched_at LIMIT ?",
            (Status.QUEUED, Status.RUNNING, cutoff, Status.QUEUED, now, now, limit),
        ).fetchall()
        return [(r[0], int(r[1]), r[2]) for r in rows]

    async def touch_dispatch(self, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        await self._run(
            self._tx,
            lambda conn: conn.executemany(
                "UPDATE tasks SET dispatched_at = ? WHERE id = ?", [(now_us(), i) for i in ids]
            ),
        )

    async def redispatch(self, task_id: str, seen_gen: int) -> bool:
        return await self._run(self._tx, lambda conn: self._redispatch(conn, task_id, seen_gen))

    def _redispatch(self, conn: sqlite3.Connection, task_id: str, seen_gen: int) -> bool:
        task, row = self._load(conn, task_id)
        if Status(task.status).terminal or int(row[4]) != seen_gen:
            return False
        gen = seen_gen + 1
        conn.execute("UPDATE tasks SET dispatch_gen = ?, dispatched_at = NULL WHERE id = ?", (gen, task_id))
        self._enqueue_dispatch(conn, task, gen, now_us())
        return True

    async def tenant_of(self, task_id: str) -> str | None:
        return await self._run(self._tenant_of, task_id)

    def _tenant_of(self, task_id: str) -> str | None:
        assert self._conn is not None
        row = self._conn.execute("SELECT tenant FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else str(row[0])


def _metadata_filter(column: str, tenant: str, metadata: Any) -> tuple[str, list[Any]]:
    parts: list[str] = []
    args: list[Any] = []
    for key, value in sorted(dict(metadata).items()):
        parts.append(
            f"AND {column} IN (SELECT task_id FROM task_metadata WHERE tenant = ? AND key = ? AND value = ?)"
        )
        args += [tenant, key, value]
    return " ".join(parts), args


def _encode_token(created: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created}:{task_id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, task_id = raw.split(":", 1)
        return int(created), task_id
    except (ValueError, UnicodeDecodeError):
        raise RequestInvalidError([Violation("page_token", "is not a token this server issued")]) from None
