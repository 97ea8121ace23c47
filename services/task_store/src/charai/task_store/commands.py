"""Command handlers: load the task, let the lifecycle core decide, persist the decision.

Each handler is one unit of work (one transaction). The rules themselves live in
:mod:`charai.core.domain.lifecycle`; what is left here is the I/O around them and the mapping of
a refusal to the error a caller sees.

**Fencing.** A write reads the task row ``FOR UPDATE`` (PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
excludes every other writer), lets the core check the transition and the attempt, then writes.
Two replicas cannot both claim, complete or cancel the same task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
from charai.core.clock import Clock
from charai.core.domain import lifecycle
from charai.core.domain.lifecycle import (
    ClaimAnswer,
    ClaimOutcome,
    Decision,
    Policy,
    Rejection,
    RejectReason,
    TaskState,
)
from charai.core.domain.states import EventType, Status
from charai.core.errors import (
    CharaiError,
    NotFailedError,
    NotFoundError,
    StaleAttemptError,
    TaskEndedError,
    TaskNotFinishedError,
)
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store import rows
from charai.task_store.backend import Backend
from charai.task_store.backlog import Backlog
from charai.task_store.creates import CreateCommands
from charai.task_store.outbox import Job, Outbox
from charai.task_store.push import Offers, pushed_response
from charai.task_store.queries import Queries
from charai.task_store.reuse import Reuse
from charai.task_store.rows import TaskRow
from charai.task_store.units import Op, Unit, UnitRunner
from charai.task_store.usage import UsageLedger
from charai.tasks.v1 import task_pb2

A = TypeVar("A")
log = structlog.get_logger("commands")
#: A worker's command, as its unary RPC carries it (see :meth:`Commands.worker_each`).
WorkerRequest = (
    spb.ClaimTaskRequest | spb.ReportProgressRequest | spb.CompleteTaskRequest | spb.FailTaskRequest
)


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimResult:
    """A claim's answer: the proto's ClaimOutcome, the task, the attempt to run under, and for
    DEFER when to ask again."""

    outcome: int
    task: task_pb2.Task | None
    attempt: int = 0
    retry_after: float = 0.0


#: What :meth:`Commands.worker_each` answers a worker's command with: a claim's result, a
#: report's status, the completed task, or a failure's (outcome, retry delay, task).
WorkerAnswer = ClaimResult | int | task_pb2.Task | tuple[int, float, task_pb2.Task]


def rejection_error(task_id: str, refused: Rejection, attempt: int = 0) -> CharaiError:
    """The error a caller sees for a command the core refused."""
    status = refused.status.seed_name
    if refused.reason is RejectReason.TASK_ENDED:
        return TaskEndedError(f"task {task_id} already {status}", status=status)
    if refused.reason is RejectReason.STALE_ATTEMPT:
        return StaleAttemptError(
            f"attempt {attempt} of task {task_id} no longer holds it"
            f" (current attempt {refused.current_attempt})"
        )
    if refused.reason is RejectReason.NOT_FINISHED:
        return TaskNotFinishedError(
            f"task {task_id} is {status}; only a finished or cancelled task can be deleted (cancel it first)",
            status=status,
        )
    return NotFailedError(f"task {task_id} is {status}; only failed tasks can be retried", status=status)


class Commands(CreateCommands):
    """The store's writes (the creates are in :class:`~charai.task_store.creates.CreateCommands`)."""

    def __init__(
        self,
        backend: Backend,
        units: UnitRunner,
        outbox: Outbox,
        queries: Queries,
        policy: Policy,
        clock: Clock,
    ) -> None:
        self._read = backend.read
        self._lock = backend.dialect.for_update
        self._brief_lock_wait = backend.dialect.brief_lock_wait
        self._any_lock_wait = backend.dialect.any_lock_wait
        self._busy = backend.busy
        self._metadata_json = backend.dialect.metadata_json
        self._units = units
        self._outbox = outbox
        self._queries = queries
        self._policy = policy
        self._clock = clock
        #: Reuse of identical requests (:mod:`charai.task_store.reuse`); None: off.
        self.reuse: Reuse | None = None
        #: Usage records and budgets (:mod:`charai.task_store.usage`); None: not metered.
        self.usage: UsageLedger | None = None
        #: Held tasks and their fair release (:mod:`charai.task_store.backlog`); None: every job
        #: is queued at create.
        self.backlog: Backlog | None = None
        #: Workers' standing offers (:mod:`charai.task_store.push`); None: push dispatch off.
        self.offers: Offers | None = None

    # -- the common path ---------------------------------------------------------------------
    async def _persist(
        self,
        unit: Unit,
        task: task_pb2.Task,
        row: TaskRow,
        before: TaskState,
        decision: Decision[Any],
        on_event: Callable[[lifecycle.Event], None] | None = None,
    ) -> None:
        """Writes what ``decision`` changed: the columns no event carries, then each event with
        the task as it was right after it (the unit appends them last), then the new job.
        ``on_event`` may change the task message (a result) before an event's snapshot."""
        after, now = decision.state, self._clock.now_us()
        columns: dict[str, Any] = {}
        if not decision.events and after.lease_owner != before.lease_owner:
            columns["lease_owner"] = after.lease_owner  # else written with the event's row
        if after.max_attempts != before.max_attempts:
            columns["max_attempts"] = after.max_attempts
        if decision.dispatch is not None:
            columns["dispatch_gen"] = decision.dispatch
            columns["dispatched_at"] = now  # its job goes to the outbox below
        if not decision.events and after.lease_expires != before.lease_expires:
            columns["lease_expires"] = after.lease_expires  # a lease renewed without an event
        if columns:
            assignments = ", ".join(f"{name} = ?" for name in columns)
            await unit.tx.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", *columns.values(), task.id)
        previous = before
        for event in decision.events:
            if on_event is not None:
                on_event(event)
            rows.write_state(task, event.state)
            unit.save(
                task,
                row.tenant,
                int(event.type),
                now,
                int(row.last_seq),
                lease_expires=event.state.lease_expires,
                next_attempt_time=event.state.next_attempt_time,
                lease_owner=event.state.lease_owner,
                same_state=event.state.status is previous.status
                and event.state.next_attempt_time == previous.next_attempt_time,
            )
            previous = event.state
        if decision.dispatch is not None:
            job = Job(task.id, decision.dispatch, int(task.type), int(task.priority))
            await self._outbox.enqueue(unit.tx, job, now)

    async def _load(
        self, unit: Unit, task_id: str, tenant: str | None = None
    ) -> tuple[task_pb2.Task, TaskRow, TaskState]:
        task, row = await rows.load(unit.tx, self._lock, task_id, tenant)
        return task, row, rows.state_of(task, row)

    # -- client commands ---------------------------------------------------------------------
    async def cancel(self, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        """Cancels the task; returns it and whether a worker was running it."""

        async def op(unit: Unit) -> tuple[task_pb2.Task, bool]:
            task, row, state = await self._load(unit, task_id, tenant)
            decision = lifecycle.cancel(state, lifecycle.Cancel(), self._clock.now_us())
            await self._persist(unit, task, row, state, decision)
            if self.backlog is not None and decision.events and state.status is Status.QUEUED:
                await self.backlog.drop(unit.tx, task_id)  # a held task leaves the backlog
            return task, bool(decision.answer)

        return await self._units.write(op)

    async def rerun(self, tenant: str, task_id: str) -> task_pb2.Task:
        """Re-runs a FAILED task (RetryTask, the dead-letter view's action)."""

        async def op(unit: Unit) -> task_pb2.Task:
            task, row, state = await self._load(unit, task_id, tenant)
            decision = lifecycle.rerun(state, lifecycle.Rerun(), self._clock.now_us(), self._policy)
            if isinstance(decision.answer, Rejection):
                raise rejection_error(task_id, decision.answer)
            await self._persist(unit, task, row, state, decision)
            return task

        return await self._units.write(op)

    async def deletable(self, tenant: str, task_id: str) -> task_pb2.Task:
        """The task, if it may be deleted now (ended); else the refusal. A read: the caller
        removes the task's media, then :meth:`delete` removes the task."""

        async def body(tx: Any) -> task_pb2.Task:
            task, row = await rows.load(tx, "", task_id, tenant)
            refused = lifecycle.delete(
                rows.state_of(task, row), lifecycle.Delete(), self._clock.now_us()
            ).answer
            if isinstance(refused, Rejection):
                raise rejection_error(task_id, refused)
            return task

        return await self._read(body)

    async def delete(self, tenant: str, task_id: str) -> bool:
        """Removes an ended task, its events, metadata rows and any leftover job (one
        transaction); False when it was already gone."""

        async def op(unit: Unit) -> bool:
            try:
                _, _, state = await self._load(unit, task_id, tenant)
            except NotFoundError:
                return False
            decision = lifecycle.delete(state, lifecycle.Delete(), self._clock.now_us())
            if isinstance(decision.answer, Rejection):
                raise rejection_error(task_id, decision.answer)
            await unit.tx.execute("DELETE FROM events WHERE task_id = ?", task_id)
            await unit.tx.execute("DELETE FROM outbox WHERE task_id = ?", task_id)
            if self._units.webhooks is not None:
                await self._units.webhooks.forget_task(unit.tx, task_id)
            if not self._metadata_json:
                await unit.tx.execute("DELETE FROM task_metadata WHERE task_id = ?", task_id)
            await unit.tx.execute("DELETE FROM tasks WHERE id = ?", task_id)
            return True

        return await self._units.write(op)

    # -- worker commands ---------------------------------------------------------------------
    async def claim(
        self, task_id: str, worker_id: str, again: bool = False, any_task: bool = False
    ) -> ClaimResult:
        """A delivered job's claim (ClaimTask); ``any_task``: the worker runs whichever task the
        answer carries, so a tenant waiting for its first turn may be run instead
        (:meth:`Backlog.first_turn`)."""
        return await self._units.write(self._claim(task_id, worker_id, again, any_task))

    def _claim(self, task_id: str, worker_id: str, again: bool, any_task: bool) -> Op[ClaimResult]:
        async def op(unit: Unit) -> ClaimResult:
            try:
                task, row, state = await self._load(unit, task_id)
            except NotFoundError:
                return ClaimResult(spb.CLAIM_OUTCOME_DONE, None)
            if row.held:
                # Back in the fair backlog (its claim ran another tenant's first turn): this
                # delivery is stale; its job is published again in its turn.
                return ClaimResult(spb.CLAIM_OUTCOME_DONE, None)
            now, command = self._clock.now_us(), lifecycle.Claim(worker_id, again)
            decision, copy = await self._decide_claim(unit, task, row, state, command, now)
            answer = decision.answer
            assert not isinstance(answer, Rejection)
            # A queued job (a first run or a due retry; not a lost attempt's takeover) may be put back.
            queued = state.status is Status.QUEUED and not again
            if any_task and queued and answer.outcome is ClaimOutcome.RUN and self.backlog is not None:
                instead = await self._first_turn(unit, task, row, worker_id, now)
                if instead is not None:
                    return instead
            if answer.outcome is ClaimOutcome.REUSED and self.usage is not None and self.reuse is not None:
                # Metered before the events are written, so the completion's snapshot shows it.
                usage = self.reuse.usage_of(task)
                await self.usage.record(unit.tx, row.tenant, task, answer.attempt, usage, direct=False)
            await self._persist(unit, task, row, state, decision, copy)
            return ClaimResult(int(answer.outcome), task, answer.attempt, answer.retry_after)

        return op

    async def _decide_claim(
        self,
        unit: Unit,
        task: task_pb2.Task,
        row: TaskRow,
        state: TaskState,
        command: lifecycle.Claim,
        now: int,
    ) -> tuple[Decision[ClaimAnswer], Callable[[lifecycle.Event], None] | None]:
        decision = lifecycle.claim(state, command, now, self._policy)
        if self.reuse is None:
            return decision, None
        # An identical task done or running changes the answer.
        return await self.reuse.reconsider(
            unit.tx, task, row.reuse_key, row.tenant, state, command, decision, now, self._policy
        )

    async def _first_turn(
        self, unit: Unit, claimed: task_pb2.Task, claimed_row: TaskRow, worker_id: str, now: int
    ) -> ClaimResult | None:
        """The claim of ``claimed`` started another tenant's first task instead (see
        :meth:`Backlog.first_turn`), or None (nobody waits for a first turn, or that task would
        not simply run: then ``claimed`` runs as asked)."""
        assert self.backlog is not None
        found = await self.backlog.first_turn(unit.tx, int(claimed.type), claimed_row.tenant)
        if found is None:
            return None
        if self._brief_lock_wait is None:
            return await self._hand_over(unit, claimed, claimed_row, worker_id, now, *found)
        # PostgreSQL: in a savepoint whose lock waits are brief. The hand-over locks another
        # tenant's task and both tenants' fair-share rows, out of the order the claim's own batch
        # (task ids) and the tenants' creates (their tenant lock first) take theirs, and such
        # claims deadlocked with creates and with each other's batches (5 to 9 a run of a probe
        # of two replicas, one failing; BENCHMARKS.md "thirty-second pass"). Waiting longer than
        # the bound, it gives way: the claimed task runs as asked, the first turn waits for the
        # next claim or release.
        mark = unit.mark()
        await unit.tx.execute("SAVEPOINT first_turn")
        await unit.tx.execute(self._brief_lock_wait)
        try:
            result = await self._hand_over(unit, claimed, claimed_row, worker_id, now, *found)
        except self._busy:
            await unit.tx.execute("ROLLBACK TO SAVEPOINT first_turn")
            await unit.tx.execute("RELEASE SAVEPOINT first_turn")
            unit.reset(mark)
            log.info("first_turn_gave_way", task_id=claimed.id, instead=found[0])
            return None
        assert self._any_lock_wait is not None
        await unit.tx.execute(self._any_lock_wait)
        await unit.tx.execute("RELEASE SAVEPOINT first_turn")
        return result

    async def _hand_over(
        self,
        unit: Unit,
        claimed: task_pb2.Task,
        claimed_row: TaskRow,
        worker_id: str,
        now: int,
        other: str,
        held: bool,
    ) -> ClaimResult | None:
        """:meth:`_first_turn` once it found ``other`` (``held``: in the backlog)."""
        assert self.backlog is not None
        task, row, state = await self._load(unit, other)
        if bool(row.held) is not held or state.status is not Status.QUEUED:
            return None
        decision, copy = await self._decide_claim(unit, task, row, state, lifecycle.Claim(worker_id), now)
        answer = decision.answer
        if not isinstance(answer, ClaimAnswer) or answer.outcome is not ClaimOutcome.RUN:
            return None
        gen = int(claimed_row.dispatch_gen)
        await self.backlog.hand_over(unit.tx, claimed, claimed_row.tenant, gen, other, row.tenant, held, now)
        await self._persist(unit, task, row, state, decision, copy)
        log.info("claim_handed_over", task_id=claimed.id, instead=other, tenant=row.tenant)
        return ClaimResult(int(answer.outcome), task, answer.attempt, answer.retry_after)

    async def _push(self, unit: Unit, job: Job, now: int, created: task_pb2.Task, row: TaskRow) -> Job | None:
        """A new task's claim for a worker's standing offer, in the create's own unit: RUNNING
        under a lease owned by that worker, its STARTED event after the QUEUED one, and the
        claim's answer sent on the worker's stream after the commit (``unit.pushed``). The job
        is still published (after the push), so the attempt has its JetStream message as a
        claimed one has: the worker takes it over when it arrives (see ``WorkerOffer``). Returns the
        job as it is to be published (naming that worker: ``Job.pushed_to``), None if not pushed.

        ``created`` and ``row``: the task and its row as the create just wrote them (not read back:
        the claim changes a copy; ``created`` stays the create's answer)."""
        taken = None if self.offers is None else self.offers.take(job.type)
        if taken is None:
            return None
        assert self.offers is not None
        outlet, worker_id = taken
        task = task_pb2.Task()
        task.CopyFrom(created)
        state = rows.state_of(task, row)
        decision, copy = await self._decide_claim(unit, task, row, state, lifecycle.Claim(worker_id), now)
        answer = decision.answer
        if not isinstance(answer, ClaimAnswer) or answer.outcome is not ClaimOutcome.RUN:
            self.offers.give_back(outlet)  # e.g. a twin runs: its claim answers, as usual
            return None
        await self._persist(unit, task, row, state, decision, copy)
        claim = spb.ClaimTaskResponse(
            outcome=spb.CLAIM_OUTCOME_RUN,
            task=task,
            attempt=answer.attempt,
            lease_seconds=self.offers.lease_seconds,
        )
        job = dataclasses.replace(job, pushed_to=worker_id)
        unit.pushed.append((outlet, pushed_response(job.message(), claim)))
        return job

    async def progress(self, task_id: str, attempt: int, progress: int, stage: str) -> int:
        return await self._units.write(self._report(task_id, attempt, progress, stage))

    async def worker_each(self, requests: Sequence[WorkerRequest]) -> list[WorkerAnswer | Exception]:
        """A worker's claims, progress reports and outcomes in one transaction, each as its own
        command (:meth:`claim`, :meth:`progress`, :meth:`complete`, :meth:`fail`) would answer
        it or the error it would raise (its writes rolled back alone): task_store runs the
        worker commands of one ``Exchange`` call this way. A refused completion whose usage was
        metered is answered with its error but keeps the usage (as :meth:`complete` does)."""
        return await self._each([(request.task_id, self._worker_op(request)) for request in requests])

    async def _each(self, ops: Sequence[tuple[str, Op[Any]]]) -> list[Any]:
        """(task id, operation) pairs in one transaction, a savepoint each, run in task id order
        (a stable sort: one task's commands keep their order), so two calls locking the same
        rows (PostgreSQL) take them in the same order; answers in the given order."""
        order = sorted(range(len(ops)), key=lambda i: ops[i][0])
        done = await self._units.write_each([ops[i][1] for i in order])
        answers: list[Any] = [None] * len(ops)
        for i, answer in zip(order, done, strict=True):
            answers[i] = answer
        return answers

    def _worker_op(self, request: WorkerRequest) -> Op[Any]:
        if isinstance(request, spb.ClaimTaskRequest):
            return self._claim(request.task_id, request.worker_id, request.again, request.any_task)
        if isinstance(request, spb.ReportProgressRequest):
            return self._report(request.task_id, request.attempt, request.progress, request.stage)
        if isinstance(request, spb.CompleteTaskRequest):
            return self._complete(request)
        return self._fail(request)

    def _report(self, task_id: str, attempt: int, progress: int, stage: str) -> Op[int]:
        async def op(unit: Unit) -> int:
            task, row, state = await self._load(unit, task_id)
            command = lifecycle.Report(attempt, progress, stage)
            decision = lifecycle.report(state, command, self._clock.now_us(), self._policy)
            if isinstance(decision.answer, Rejection):
                raise rejection_error(task_id, decision.answer, attempt)
            await self._persist(unit, task, row, state, decision)
            return int(decision.answer)

        return op

    async def _meter(
        self,
        unit: Unit,
        task: task_pb2.Task,
        tenant: str,
        req: spb.CompleteTaskRequest | spb.FailTaskRequest,
        *,
        direct: bool,
    ) -> bool:
        """Records the attempt's usage report, if it has one and it is new (see
        :meth:`UsageLedger.record`; ``direct``: no event of this command carries the task)."""
        if self.usage is None or not req.HasField("usage"):
            return False
        return await self.usage.record(unit.tx, tenant, task, req.attempt, req.usage, direct=direct)

    async def complete(self, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        answer = await self._units.write(self._complete(req))
        if isinstance(answer, CharaiError):
            raise answer
        return answer

    def _complete(self, req: spb.CompleteTaskRequest) -> Op[task_pb2.Task | CharaiError]:
        """The completion; a refusal is returned, not raised, when the attempt's usage was
        metered: the provider was paid, so that write commits even though the result is refused."""

        async def op(unit: Unit) -> task_pb2.Task | CharaiError:
            task, row, state = await self._load(unit, req.task_id)
            command = lifecycle.Complete(req.attempt, req.progress, req.stage)
            decision = lifecycle.complete(state, command, self._clock.now_us())
            if isinstance(decision.answer, Rejection):
                refused = rejection_error(req.task_id, decision.answer, req.attempt)
                if await self._meter(unit, task, row.tenant, req, direct=True):
                    return refused  # committed: the provider was paid even if the result is refused
                raise refused
            await self._meter(unit, task, row.tenant, req, direct=not decision.events)

            def with_result(event: lifecycle.Event) -> None:
                if event.type is EventType.COMPLETED:  # the progress event before it has none yet
                    if req.WhichOneof("result") == "image_result":
                        task.image_result.CopyFrom(req.image_result)
                    else:
                        task.tts_result.CopyFrom(req.tts_result)

            await self._persist(unit, task, row, state, decision, with_result)
            return task

        return op

    async def fail(self, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        return await self._units.write(self._fail(req))

    def _fail(self, req: spb.FailTaskRequest) -> Op[tuple[int, float, task_pb2.Task]]:
        async def op(unit: Unit) -> tuple[int, float, task_pb2.Task]:
            task, row, state = await self._load(unit, req.task_id)
            command = lifecycle.Fail(req.attempt, rows.failure_of(req.error), req.retry_after_seconds or None)
            decision = lifecycle.fail(state, command, self._clock.now_us(), self._policy)
            await self._meter(unit, task, row.tenant, req, direct=not decision.events)  # also if IGNORED
            await self._persist(unit, task, row, state, decision)
            answer = decision.answer
            assert not isinstance(answer, Rejection)
            return int(answer.outcome), answer.delay, task

        return op

    # -- the sweeper -------------------------------------------------------------------------
    async def redispatch(self, task_id: str, seen_gen: int) -> bool:
        """Queues a new job for the task unless it ended or was re-dispatched since ``seen_gen``."""

        async def op(unit: Unit) -> bool:
            task, row, state = await self._load(unit, task_id)
            decision = lifecycle.redispatch(state, lifecycle.Redispatch(seen_gen), self._clock.now_us())
            await self._persist(unit, task, row, state, decision)
            return bool(decision.answer)

        return await self._units.write(op)
