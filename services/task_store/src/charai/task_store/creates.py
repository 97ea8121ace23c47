"""The create commands of :class:`~charai.task_store.commands.Commands` (a mixin of it: the same
units, outbox, queries, clock and policy): a task's creation, alone, in a batch that is all or
none, or many independent ones in one transaction (the creates of one ``Exchange`` call).

A create inserts the task row (and, on SQLite, its metadata rows), records its QUEUED event, and
either claims it for a worker's standing offer (push dispatch, :mod:`charai.task_store.push`),
queues its job (written already claimed for the local relay, handed to it after commit) or holds
it in the fair-share backlog; ``request_id`` makes it idempotent per tenant.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from charai.core import ids
from charai.core.clock import Clock
from charai.core.domain import lifecycle, reach
from charai.core.domain.lifecycle import Policy, TaskState
from charai.core.timestamps import set_micros
from charai.core.validation import RequestInvalidError, Violation, fill_metadata, in_batch
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store import rows
from charai.task_store.backlog import Backlog
from charai.task_store.outbox import Job, Outbox
from charai.task_store.push import Offers
from charai.task_store.queries import Queries
from charai.task_store.reuse import Reuse
from charai.task_store.units import Op, Unit, UnitRunner
from charai.task_store.usage import UsageLedger
from charai.tasks.v1 import task_pb2, task_service_pb2

Made = list[tuple[task_pb2.Task, bool]]


@dataclasses.dataclass(frozen=True, slots=True)
class Asker:
    """Who a batch of creates answers: a BatchCreateTasks (``batch``: its refusals name
    ``requests[i].field``) or a CreateTask, with its access token's reach (``scope``; None:
    a tenant key)."""

    batch: bool = False
    scope: spb.CreateScope | None = None


class CreateCommands:
    """Creating tasks; :class:`~charai.task_store.commands.Commands` sets these attributes."""

    _units: UnitRunner
    _outbox: Outbox
    _queries: Queries
    _policy: Policy
    _clock: Clock
    _metadata_json: bool
    reuse: Reuse | None
    usage: UsageLedger | None
    backlog: Backlog | None
    offers: Offers | None
    #: Claims a new task for a worker's standing offer (push dispatch): the job to publish, naming
    #: that worker; None: no offer, or the claim would not simply run (``Commands._push``).
    _push: Callable[[Unit, Job, int, task_pb2.Task, rows.TaskRow], Awaitable[Job | None]]

    async def create(
        self,
        tenant: str,
        req: task_service_pb2.CreateTaskRequest,
        traceparent: str = "",
        scope: spb.CreateScope | None = None,
    ) -> tuple[task_pb2.Task, bool]:
        """The new task (and True), or the one this ``request_id`` already created (and False),
        if ``scope`` (the caller's access token's reach; None: a tenant key) reaches it.

        ``traceparent`` (W3C trace context of the creating call) travels with the job.
        """
        return await self._units.write(lambda unit: self._create(unit, tenant, req, traceparent, scope))

    async def create_many(
        self,
        tenant: str,
        requests: Sequence[task_service_pb2.CreateTaskRequest],
        traceparent: str = "",
        scope: spb.CreateScope | None = None,
    ) -> list[tuple[task_pb2.Task, bool]]:
        """Several creates in one transaction (all or none), answered in order; a request whose
        ``request_id`` is already taken (earlier, or by an earlier request of this batch) answers
        that task. A refusal names ``requests[i].field``."""
        batch = [(req, traceparent) for req in requests]
        return await self._units.write(self._batch_op(tenant, batch, Asker(True, scope)))

    async def create_each(
        self,
        tenant: str,
        batches: Sequence[Sequence[tuple[task_service_pb2.CreateTaskRequest, str]]],
        askers: Sequence[Asker] = (),
    ) -> list[list[tuple[task_pb2.Task, bool]] | Exception]:
        """Independent batches of creates (``(request, traceparent)`` each; a single create is a
        batch of one) in one transaction: each batch as :meth:`create_many` would answer it, or
        the error it would raise (its writes rolled back to a savepoint, the other batches kept).
        One commit and one unit of work for many callers: task_store runs the creates of one
        ``Exchange`` call this way. ``askers[i]``: who batch ``i`` answers (default: a
        CreateTask with a tenant key)."""
        who = list(askers) or [Asker()] * len(batches)
        ops = [self._batch_op(tenant, batch, asker) for batch, asker in zip(batches, who, strict=True)]
        return await self._units.write_each(ops)

    def _batch_op(
        self, tenant: str, batch: Sequence[tuple[task_service_pb2.CreateTaskRequest, str]], asker: Asker
    ) -> Op[Made]:
        async def op(unit: Unit) -> list[tuple[task_pb2.Task, bool]]:
            made = []
            for n, (req, tp) in enumerate(batch):
                try:
                    made.append(await self._create(unit, tenant, req, tp, asker.scope))
                except RequestInvalidError as exc:
                    if not asker.batch:
                        raise
                    raise RequestInvalidError(in_batch(n, exc.violations)) from None
            return made

        return op

    def _new_task(self, req: task_service_pb2.CreateTaskRequest, state: TaskState, now: int) -> task_pb2.Task:
        task = task_pb2.Task(
            id=ids.new_task_id(now),
            type=req.type,
            priority=req.priority or task_pb2.PRIORITY_NORMAL,
            metadata=fill_metadata(req),
            request_id=req.request_id,
        )
        if req.HasField("webhook"):
            task.webhook.CopyFrom(req.webhook)
        rows.write_state(task, state)
        if req.WhichOneof("payload") == "image":
            task.image.CopyFrom(req.image)
        else:
            task.tts.CopyFrom(req.tts)
        set_micros(task.create_time, now)
        set_micros(task.update_time, now)
        return task

    async def _create(
        self,
        unit: Unit,
        tenant: str,
        req: task_service_pb2.CreateTaskRequest,
        traceparent: str,
        scope: spb.CreateScope | None = None,
    ) -> tuple[task_pb2.Task, bool]:
        if req.request_id:
            existing = await self._by_request_id(unit, tenant, req, scope)
            if existing is not None:
                return existing, False
        if self.usage is not None:  # RESOURCE_EXHAUSTED naming the budget; nothing stored
            await self.usage.check_budgets(unit.tx, tenant)
        # Fair share: held in the backlog unless the buffer has room and nobody else waits.
        held = self.backlog is not None and await self.backlog.holds(unit, tenant, int(req.type))
        now = self._clock.now_us()
        decision = lifecycle.create(self._policy, now)
        task = self._new_task(req, decision.state, now)
        [queued] = decision.events
        # The event first: the row is inserted as its snapshot, with its sequence where the
        # backend takes it now (SQLite), so nothing writes the row again at the unit's end.
        unit.save(task, tenant, int(queued.type), now, 0)
        seq = await self._units.insert_now(unit)
        row = await self._insert(unit, tenant, task, now, held, unit.saves[-1].blob, seq)
        if row is None:
            # A concurrent create with the same request_id (another replica, a retried call) made
            # this insert do nothing; that task is then the answer. PostgreSQL only, whose event
            # is not inserted yet: SQLite has one writer, and the request_id was looked up above
            # in this transaction.
            assert not seq, "a create's event was inserted ahead of a row that conflicted"
            unit.saves.pop()
            existing = await self._by_request_id(unit, tenant, req, scope)
            if existing is None:  # pragma: no cover - the conflicting row is committed by now
                raise RuntimeError("request_id conflict without a task")
            return existing, False
        # The row holds the snapshot and state its event carries: only its last_seq is left to
        # write with the event (PostgreSQL; SQLite inserted the event first).
        unit.saves[-1].row_written = True
        job = Job(task.id, decision.state.dispatch_gen, int(task.type), int(task.priority), traceparent)
        if self.backlog is not None:
            await self.backlog.admit(unit, tenant, job, now, held=held)
        if not held:
            pushed = await self._push(unit, job, now, task, row)
            handed = await self._outbox.enqueue(unit.tx, pushed or job, now, hand_off=True)
            if handed is not None:
                # A pushed job is published after the commit, behind its push (see ``_push``).
                (unit.handed if pushed else unit.handed_new).append(handed)
        # The answer is the task as created (QUEUED), even when it was pushed to a worker.
        await self._queries.position(unit.tx, task, held)
        return task, True

    async def _insert(
        self, unit: Unit, tenant: str, task: task_pb2.Task, now: int, held: bool, blob: bytes, last_seq: int
    ) -> rows.TaskRow | None:
        """Inserts the task row (``held``: in the fair-share backlog; ``blob``, its snapshot;
        ``last_seq``, its event's sequence if known yet, else 0; and its metadata rows on SQLite)
        and returns it as :func:`rows.load` would read it back; None if its request_id is taken."""
        columns = "id, tenant, request_id, type, priority, status, attempt, max_attempts,"
        columns += " create_time, update_time, dispatch_gen, held, task, reuse_key, last_seq,"
        columns += " dispatched_at"
        values = "?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 1, ?, ?, ?, ?, ?"
        key = self.reuse.key(tenant, task) if self.reuse is not None else None
        args: list[Any] = [task.id, tenant, task.request_id or None, int(task.type), int(task.priority)]
        args += [int(task.status), task.max_attempts, now, now, int(held), blob, key, last_seq]
        args.append(None if held else now)  # dispatched: its job enters the outbox in this unit
        if self._metadata_json:
            columns += ", metadata"
            values += ", ?::jsonb"
            args.append(json.dumps(dict(task.metadata), separators=(",", ":")))
        # The count of rows inserted, not RETURNING id: SQLite steps no result row (~4 µs).
        inserted = await unit.tx.execute(
            f"INSERT INTO tasks ({columns}) VALUES ({values})"
            " ON CONFLICT (tenant, request_id) WHERE request_id IS NOT NULL DO NOTHING",
            *args,
        )
        if not inserted:
            return None
        if not self._metadata_json:
            await unit.tx.executemany(
                "INSERT INTO task_metadata (task_id, tenant, key, value) VALUES (?, ?, ?, ?)",
                [(task.id, tenant, k, v) for k, v in task.metadata.items()],
            )
        # The columns as inserted (the lease's come with a claim).
        return rows.TaskRow(blob, tenant, 0, None, 1, last_seq, None, int(task.status), None, int(held), key)

    async def _by_request_id(
        self,
        unit: Unit,
        tenant: str,
        req: task_service_pb2.CreateTaskRequest,
        scope: spb.CreateScope | None,
    ) -> task_pb2.Task | None:
        row = await unit.tx.fetchrow(
            "SELECT id FROM tasks WHERE tenant = ? AND request_id = ?", tenant, req.request_id
        )
        if row is None:
            return None
        existing, _ = await rows.load(unit.tx, "", row[0])
        if scope is not None and not reach.reaches(
            scope.task_ids, scope.metadata.items(), existing.id, existing.metadata
        ):
            # Not the task (a token could read any task of its tenant by replaying request_ids).
            raise RequestInvalidError([Violation("request_id", "was already used for another task")])
        if existing.type != req.type:
            raise RequestInvalidError(
                [Violation("request_id", "was already used for a task of another type")]
            )
        await self._queries.position(unit.tx, existing)
        return existing
