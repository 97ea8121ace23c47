"""Reads: one task, lists of tasks, the event log, queue positions and queue statistics.

Every answer is computed from the shared database, so it is the same whichever replica answers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from charai.core.clock import Clock
from charai.core.timestamps import set_micros
from charai.core.validation import MAX_INT64, RequestInvalidError, Violation
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store import placement, rows
from charai.task_store.backend import Backend, Tx
from charai.task_store.eta import EtaBook
from charai.task_store.schema import ENDED
from charai.tasks.v1 import task_pb2, task_service_pb2

DEFAULT_PAGE = 50
#: A ListTasks page stops before its stored tasks pass this many bytes (at least one task a
#: page), whatever ``page_size`` asks: a task at every size limit is about 52 KB, and a page of
#: 500 such was 26 MB, over the gateway's 8 MiB send limit (every list failed, REST's default
#: one included) and a default gRPC client's 4 MiB receive limit.
MAX_PAGE_BYTES = 3 * 1024 * 1024


def within(sizes: Iterable[int], budget: int) -> int:
    """How many of the first items of these sizes fit in ``budget`` bytes: at least one (when
    there is one), so an item larger than the budget still goes, alone. A page's cut."""
    taken = total = 0
    for size in sizes:
        total += size
        if taken and total > budget:
            break
        taken += 1
    return taken


def encode_page_token(created: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created}:{task_id}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, task_id = raw.split(":", 1)
        if not 0 <= int(created) <= MAX_INT64:
            raise ValueError(created)
        return int(created), task_id
    except (ValueError, UnicodeDecodeError):
        raise RequestInvalidError([Violation("page_token", "is not a token this server issued")]) from None


class Queries:
    """The store's reads."""

    def __init__(self, backend: Backend, clock: Clock, eta: EtaBook | None = None) -> None:
        self._db = backend
        self._dialect = backend.dialect
        self._clock = clock
        self._eta = eta

    # -- tasks -------------------------------------------------------------------------------
    async def get(self, tenant: str, task_id: str) -> task_pb2.Task:
        async def body(tx: Tx) -> task_pb2.Task:
            task, _ = await rows.load(tx, "", task_id, tenant)
            await self.position(tx, task)
            return task

        return await self._db.read(body)

    async def tenant_of(self, task_id: str) -> str | None:
        row = await self._db.read(lambda tx: tx.fetchrow("SELECT tenant FROM tasks WHERE id = ?", task_id))
        return None if row is None else str(row[0])

    async def list_tasks(
        self, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        return await self._db.read(lambda tx: self._list_tasks(tx, tenant, req))

    async def _list_tasks(
        self, tx: Tx, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        sql = ["SELECT task FROM tasks WHERE tenant = ?"]
        args: list[Any] = [tenant]
        sql_filter, filter_args = self.metadata_filter("id", tenant, req.metadata)
        sql.append(sql_filter)
        args += filter_args
        if req.type:
            sql.append("AND type = ?")
            args.append(int(req.type))
        if req.status:
            sql.append("AND status = ?")
            args.append(int(req.status))
        if req.page_token:
            created, last_id = decode_page_token(req.page_token)
            sql.append("AND (create_time < ? OR (create_time = ? AND id < ?))")
            args += [created, created, last_id]
        size = req.page_size or DEFAULT_PAGE
        sql.append("ORDER BY create_time DESC, id DESC LIMIT ?")
        args.append(size + 1)
        found = await tx.fetch(" ".join(sql), *args)
        taken = within((len(r[0]) for r in found[:size]), MAX_PAGE_BYTES)  # the next page starts after
        tasks = [task_pb2.Task.FromString(r[0]) for r in found[:taken]]
        await self.positions(tx, tasks)
        token = ""
        if len(found) > taken:
            last = tasks[-1]
            token = encode_page_token(last.create_time.ToMicroseconds(), last.id)
        return tasks, token

    def metadata_filter(self, column: str, tenant: str, metadata: Mapping[str, str]) -> tuple[str, list[Any]]:
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

    async def ended_before(self, cutoff_us: int, limit: int = 200) -> list[tuple[str, task_pb2.Task]]:
        """Ended tasks (completed, failed, cancelled) last changed before ``cutoff_us``, oldest
        first, with their tenants: the retention sweeper's candidates (served by ``tasks_ended``)."""
        # The statuses are literals, not parameters: only then can the planner see that the
        # partial index's condition holds (the same literals as in the schema).
        found = await self._db.read(
            lambda tx: tx.fetch(
                f"SELECT tenant, task FROM tasks WHERE {ENDED} AND update_time < ?"
                " ORDER BY update_time LIMIT ?",
                cutoff_us,
                limit,
            )
        )
        return [(str(r[0]), task_pb2.Task.FromString(r[1])) for r in found]

    # -- queue position ----------------------------------------------------------------------
    async def position(self, tx: Tx, task: task_pb2.Task, in_backlog: bool | None = None) -> None:
        """Fills ``queue_position`` and, from it, the estimated start (or end) time
        (``in_backlog``: whether the task is held in the fair-share backlog, when the caller
        knows; see :func:`placement.place`)."""
        await self._position(tx, task, in_backlog)
        if self._eta is not None:
            self._eta.fill(task, self._clock.time())

    async def positions(self, tx: Tx, tasks: Sequence[task_pb2.Task]) -> None:
        """:meth:`position` for each task of a page, placed together (:func:`placement.place_page`)."""
        await placement.place_page(tx, tasks)
        if self._eta is not None:
            now = self._clock.time()
            for task in tasks:
                self._eta.fill(task, now)

    async def _position(self, tx: Tx, task: task_pb2.Task, in_backlog: bool | None = None) -> None:
        """Fills ``queue_position``: the task's place in the order tasks of its type will start
        in, 1 = next (:func:`placement.place`, which knows the fair-share order), 0 unless queued.
        Computed in SQL, so it is the same whichever replica answers."""
        if task.status != task_pb2.TASK_STATUS_QUEUED:
            task.queue_position = 0
            return
        await placement.place(tx, task, in_backlog)

    # -- the event log -----------------------------------------------------------------------
    async def list_events(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        """:meth:`events_page` without its ``more``."""
        events, head, _ = await self.events_page(req)
        return events, head

    async def events_page(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int, bool]:
        """Events after ``req.after_sequence`` in sequence order, the head sequence, and whether
        the page stopped at ``req.max_bytes`` (more may follow its last event).

        The head is read *before* the events: every event up to it is committed (sequence order is
        commit order), so all of those that match are in the answer (unless ``limit`` cut it) and
        a watcher may move its cursor to the head.
        """
        return await self._db.read(lambda tx: self._list_events(tx, req))

    async def _list_events(
        self, tx: Tx, req: spb.ListEventsRequest
    ) -> tuple[list[task_pb2.TaskEvent], int, bool]:
        limit = min(req.limit or 500, 5000)
        head = int(await tx.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events"))
        if req.task_id:
            found = await tx.fetch(
                "SELECT seq, type, time, task FROM events WHERE task_id = ? AND tenant = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                req.task_id,
                req.tenant,
                req.after_sequence,
                limit,
            )
        else:
            sql_filter, filter_args = self.metadata_filter("task_id", req.tenant, req.metadata)
            type_sql = "AND task_type = ?" if req.type else ""
            args: list[Any] = [req.tenant, req.after_sequence, *filter_args]
            if req.type:
                args.append(int(req.type))
            found = await tx.fetch(
                "SELECT seq, type, time, task FROM events WHERE tenant = ? AND seq > ?"
                f" {sql_filter} {type_sql} ORDER BY seq LIMIT ?",
                *args,
                limit,
            )
        taken = within((len(r[3]) for r in found), req.max_bytes) if req.max_bytes else len(found)
        events = []
        for seq, etype, etime, blob in found[:taken]:
            event = task_pb2.TaskEvent(sequence=seq, type=etype, task=task_pb2.Task.FromString(blob))
            set_micros(event.time, etime)
            events.append(event)
        return events, head, taken < len(found)
