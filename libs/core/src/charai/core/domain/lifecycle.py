"""The task lifecycle as pure decisions: (task state, command, now) → decision.

Every rule of a task's life is decided here, and nowhere else: when a delivered job runs, waits,
is dropped or reuses an identical task's result (claim), when a lease is taken over, when a
failure is retried or final, what a completion or a cancel changes, when an operator's re-run is
allowed and when the sweeper re-dispatches a job. The store only loads a task, asks one of these
functions, and persists the answer (see ``charai.task_store.commands``). Nothing here does I/O,
reads a clock or touches protobuf, so the rules are tested directly, thousands of cases a second
(tests/unit).

A :class:`Decision` says everything the caller must do: the task's state afterwards, the events
to append (each with the state right after it, so a watcher sees every step), the job to publish
(a new dispatch generation), and the answer to the caller. A command that must be refused
returns a :class:`Rejection` as its answer and changes nothing.

Times are integers in microseconds since the epoch, as the store keeps them.

Progress never decreases over a task's life, whatever happens to it (a retry, a lost worker, a
cancel, an operator's re-run): a progress bar must not go backwards. A retry shows in ``stage``
(``waiting_retry``), ``attempt`` and its own event instead; a new attempt starts at the progress
the task already has (at least 10).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from typing import Generic, TypeVar

from charai.core.domain import states
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.domain.states import EventType, Stage, Status, Transition

A_co = TypeVar("A_co", covariant=True)
T = TypeVar("T")
#: Longest stage word kept (longer ones are cut).
STAGE_MAX = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """An error recorded on a task (the proto's ``TaskError``)."""

    kind: ErrorKind
    message: str
    retryable: bool = False
    provider_status: int = 0
    provider_code: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TaskState:
    """What the lifecycle rules read and write of a task (its payload, result and metadata are
    the store's business: they never change a decision)."""

    status: Status
    max_attempts: int
    attempt: int = 0
    progress: int = states.PROGRESS_QUEUED
    stage: str = Stage.QUEUED
    #: Increases each time a job for the task is (re)published; a job names its generation.
    dispatch_gen: int = 1
    #: While RUNNING: until when the current attempt holds the task without reporting.
    lease_expires: int | None = None
    #: The worker that claimed the current attempt (for operators; never decides anything).
    lease_owner: str | None = None
    #: While waiting for a retry: when the next attempt may start.
    next_attempt_time: int | None = None
    start_time: int | None = None
    end_time: int | None = None
    error: Failure | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """The settings the rules depend on."""

    max_attempts: int = 6
    lease_seconds: float = 30.0
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    #: Jitter source of retry delays (tests pass a seeded one).
    rng: random.Random | None = None

    def lease_until(self, now: int) -> int:
        return now + int(self.lease_seconds * 1_000_000)

    def run_attempt(self, state: TaskState) -> int:
        """The attempt's number within the current run: a task re-run by an operator keeps
        counting attempts (its history stays readable), but the retry policy judges each run
        from its first attempt, so a re-run gets the whole retry budget again."""
        base = max(0, state.max_attempts - self.max_attempts)
        return max(1, state.attempt - base)

    def retry_delay(
        self, kind: ErrorKind, state: TaskState, retry_after: float | None = None
    ) -> float | None:
        """Seconds until the next attempt after ``state``'s attempt failed with ``kind``, or None
        when the task must fail now (the kind allows no more retries, or the task's own attempt
        budget is spent)."""
        if state.attempt >= state.max_attempts:
            return None
        return self.retry.decide(kind, self.run_attempt(state), retry_after, self.rng)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event to append to the task's log, with the task's state right after it."""

    type: EventType
    state: TaskState


class RejectReason(enum.Enum):
    """Why a command was refused (each maps to a gRPC status at the edge)."""

    TASK_ENDED = "TASK_ENDED"  # a report for a task that already reached a terminal state
    STALE_ATTEMPT = "STALE_ATTEMPT"  # a report from an attempt that no longer holds the task
    NOT_FAILED = "TASK_NOT_FAILED"  # a re-run of a task that is not FAILED
    NOT_FINISHED = "TASK_NOT_FINISHED"  # a delete of a task that is still queued or running


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A refused command: nothing changed."""

    reason: RejectReason
    status: Status
    #: The attempt that holds the task now (for STALE_ATTEMPT messages).
    current_attempt: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Decision(Generic[A_co]):
    """What a command does to a task."""

    #: The task's state afterwards (the input itself when nothing changed).
    state: TaskState
    #: The answer to the caller (or a :class:`Rejection`).
    answer: A_co | Rejection
    #: Events to append, in order.
    events: tuple[Event, ...] = ()
    #: A job to publish: its dispatch generation (None: none).
    dispatch: int | None = None

    @property
    def rejected(self) -> bool:
        return isinstance(self.answer, Rejection)


# -- answers ---------------------------------------------------------------------------------
class ClaimOutcome(enum.IntEnum):
    """What a worker does with a delivered job (values equal the store proto's ClaimOutcome)."""

    RUN = 1  # run it under the returned attempt
    DONE = 2  # nothing to do (the task ended): acknowledge the job
    DEFER = 3  # not yet (retry not due, another attempt holds a live lease, a twin runs): ask again later
    REUSED = 4  # completed here with a twin's result (no provider call): acknowledge the job


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimAnswer:
    outcome: ClaimOutcome
    attempt: int = 0
    #: For DEFER: seconds until asking again makes sense.
    retry_after: float = 0.0


class FailOutcome(enum.IntEnum):
    """What the store decided after a failed attempt (values equal the store proto's)."""

    RETRY = 1  # another attempt after ``delay``
    FAILED = 2  # failed for good
    IGNORED = 3  # the attempt was stale or the task had ended


@dataclasses.dataclass(frozen=True, slots=True)
class FailAnswer:
    outcome: FailOutcome
    delay: float = 0.0


#: While a twin runs, a claim is deferred for half the time the twin has been running, within
#: these bounds (seconds): a short TTS call is picked up soon after it ends, a long image costs
#: a few redeliveries, not dozens (each one counts towards the consumer's max_deliver).
TWIN_WAIT_MIN = 0.25
TWIN_WAIT_MAX = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Twin:
    """An identical earlier request of the same tenant (README, "Identical requests are reused"),
    as the store found it for a claim: COMPLETED within the reuse TTL (its result is reused), or
    RUNNING under a live lease (the claim waits for it). ``start_time``: when the twin started."""

    status: Status
    start_time: int | None = None


# -- commands --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A worker asks to run the task's delivered job; ``again``: its earlier claim of this job
    got no answer (see :func:`claim`); ``twin``: an identical task the store found (only looked
    for when the claim would start an attempt)."""

    worker_id: str = ""
    again: bool = False
    twin: Twin | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """The running attempt reports progress (and so renews its lease)."""

    attempt: int
    progress: int
    stage: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Complete:
    """The running attempt finished with a result; ``progress``/``stage``: its last progress
    not reported yet (0: none), recorded as its own event just before the completion."""

    attempt: int
    progress: int = 0
    stage: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """The running attempt failed with ``error`` (its ``retryable`` is recomputed here)."""

    attempt: int
    error: Failure
    retry_after: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """A client cancels the task."""


@dataclasses.dataclass(frozen=True, slots=True)
class Rerun:
    """An operator re-runs a FAILED task with a fresh attempt budget."""


@dataclasses.dataclass(frozen=True, slots=True)
class Redispatch:
    """The sweeper found the task's job missing from the stream; ``seen_gen``: the generation it
    looked for (a newer one means somebody re-dispatched it meanwhile)."""

    seen_gen: int


@dataclasses.dataclass(frozen=True, slots=True)
class Delete:
    """A client removes the task (DeleteTask), or the retention sweeper does."""


Command = Claim | Report | Complete | Fail | Cancel | Rerun | Redispatch | Delete


# -- the rules -------------------------------------------------------------------------------
def create(policy: Policy, now: int) -> Decision[None]:
    """A new task: QUEUED, its first event, and its first job."""
    state = TaskState(status=Status.QUEUED, max_attempts=policy.max_attempts)
    return Decision(state, None, (Event(EventType.QUEUED, state),), dispatch=state.dispatch_gen)


def _step(state: TaskState, transition: Transition, **changes: object) -> Event:
    """The event of ``transition`` with the state it leads to. Every event write clears the
    lease and the retry time unless ``changes`` set them (they belong to one status each)."""
    after = dataclasses.replace(
        state,
        status=states.apply(state.status, transition),
        **{"lease_expires": None, "next_attempt_time": None, **changes},  # type: ignore[arg-type]
    )
    return Event(transition.event, after)


def _decided(state: TaskState, answer: T, *events: Event, dispatch: int | None = None) -> Decision[T]:
    return Decision(events[-1].state if events else state, answer, events, dispatch)


def _fail_now(state: TaskState, kind: ErrorKind, message: str, now: int) -> Event:
    return _step(
        state,
        Transition.FAIL,
        error=Failure(kind, message, retryable=False),
        stage=Stage.FAILED,
        end_time=now,
    )


def claim(state: TaskState, cmd: Claim, now: int, policy: Policy) -> Decision[ClaimAnswer]:
    """Run, defer or drop a delivered job.

    QUEUED: deferred until its retry is due; failed when no attempts are left; else started.
    RUNNING: deferred while the current attempt's lease lives (unless its holder asks again
    because the answer to its claim was lost: the same attempt again); once it expired, that attempt's
    worker is gone: the task is taken over by a new attempt (a WORKER_LOST retry), or fails when
    the retry policy allows no more.

    A claim that would start an attempt and names a ``twin`` (an identical request): a COMPLETED
    twin's result is reused (the attempt starts and completes at once, answered REUSED); a
    RUNNING one is waited for (DEFER), so the claim reuses its result once it completes, or
    runs if it fails or is cancelled. Any other twin changes nothing.
    """
    if state.status.terminal:
        return Decision(state, ClaimAnswer(ClaimOutcome.DONE))
    error = state.error
    if state.status is Status.QUEUED:
        due = state.next_attempt_time
        if due is not None and due > now:
            return Decision(state, ClaimAnswer(ClaimOutcome.DEFER, retry_after=(due - now) / 1e6))
        if state.attempt >= state.max_attempts:
            failed = _fail_now(state, ErrorKind.WORKER_LOST, "no attempts left", now)
            return _decided(state, ClaimAnswer(ClaimOutcome.DONE), failed)
    else:
        lease = state.lease_expires or 0
        if lease > now:
            if cmd.again and cmd.worker_id and cmd.worker_id == state.lease_owner:
                # The holder asks again because its claim's answer was lost (it has not run the
                # attempt): answered again, not left waiting for the lease to expire.
                return Decision(state, ClaimAnswer(ClaimOutcome.RUN, attempt=state.attempt))
            return Decision(state, ClaimAnswer(ClaimOutcome.DEFER, retry_after=(lease - now) / 1e6))
        lost = f"the worker running attempt {state.attempt} was lost"
        if policy.retry_delay(ErrorKind.WORKER_LOST, state) is None:
            failed = _fail_now(state, ErrorKind.WORKER_LOST, f"{lost} and no attempts are left", now)
            return _decided(state, ClaimAnswer(ClaimOutcome.DONE), failed)
        error = Failure(ErrorKind.WORKER_LOST, lost, retryable=True)
    twin = cmd.twin
    if twin is not None and twin.status is Status.RUNNING:
        return Decision(state, ClaimAnswer(ClaimOutcome.DEFER, retry_after=_twin_wait(twin, now)))
    attempt = state.attempt + 1
    started = _step(
        state,
        Transition.START,
        attempt=attempt,
        progress=max(state.progress, states.PROGRESS_STARTED),
        stage=Stage.STARTING,
        start_time=state.start_time if state.start_time is not None else now,
        lease_expires=policy.lease_until(now),
        lease_owner=cmd.worker_id or None,
        error=error,
    )
    if twin is not None and twin.status is Status.COMPLETED:
        # The usual events (started, completed), so watchers and webhooks see a normal life.
        done = _completed(started.state, now)
        return _decided(state, ClaimAnswer(ClaimOutcome.REUSED, attempt=attempt), started, done)
    return _decided(state, ClaimAnswer(ClaimOutcome.RUN, attempt=attempt), started)


def _twin_wait(twin: Twin, now: int) -> float:
    """Seconds until a claim waiting for a running twin asks again (:data:`TWIN_WAIT_MIN`)."""
    running_for = max(0, now - (twin.start_time if twin.start_time is not None else now)) / 1e6
    return min(TWIN_WAIT_MAX, max(TWIN_WAIT_MIN, running_for / 2))


def _completed(state: TaskState, now: int) -> Event:
    return _step(
        state,
        Transition.COMPLETE,
        progress=states.PROGRESS_DONE,
        stage=Stage.COMPLETED,
        error=None,
        end_time=now,
    )


def _fence(state: TaskState, attempt: int) -> Rejection | None:
    """Only the attempt holding the task (the latest claim) may report on it."""
    if state.status.terminal:
        return Rejection(RejectReason.TASK_ENDED, state.status, state.attempt)
    if not states.fenced(state.attempt, attempt, state.status):
        return Rejection(RejectReason.STALE_ATTEMPT, state.status, state.attempt)
    return None


def _progressed(state: TaskState, progress: int, stage: str) -> tuple[int, str]:
    return states.clamp_progress(state.progress, progress), stage[:STAGE_MAX] or state.stage


def report(state: TaskState, cmd: Report, now: int, policy: Policy) -> Decision[Status]:
    """Progress of the running attempt: an event when progress or stage changed; in any case
    the lease is renewed. Answers the task's status."""
    refused = _fence(state, cmd.attempt)
    if refused is not None:
        return Decision(state, refused)
    lease = policy.lease_until(now)
    progress, stage = _progressed(state, cmd.progress, cmd.stage)
    if (progress, stage) == (state.progress, state.stage):
        return Decision(dataclasses.replace(state, lease_expires=lease), state.status)
    moved = _step(state, Transition.PROGRESS, progress=progress, stage=stage, lease_expires=lease)
    return _decided(state, state.status, moved)


def complete(state: TaskState, cmd: Complete, now: int) -> Decision[None]:
    """The attempt's result: COMPLETED (after its last progress, when that is news). A repeated
    completion of the attempt that completed the task (its acknowledgement was lost) changes
    nothing and is answered again."""
    if state.status is Status.COMPLETED and state.attempt == cmd.attempt:
        return Decision(state, None)
    refused = _fence(state, cmd.attempt)
    if refused is not None:
        return Decision(state, refused)
    events: list[Event] = []
    current = state
    if cmd.progress > 0:
        progress, stage = _progressed(state, cmd.progress, cmd.stage)
        if (progress, stage) != (state.progress, state.stage):
            events.append(_step(state, Transition.PROGRESS, progress=progress, stage=stage))
            current = events[-1].state
    events.append(_completed(current, now))
    return _decided(state, None, *events)


def fail(state: TaskState, cmd: Fail, now: int, policy: Policy) -> Decision[FailAnswer]:
    """A failed attempt: another one after a backoff while the error's kind and the attempt
    budget allow it, else FAILED. A stale attempt's failure, or one for an ended task, is
    ignored."""
    if _fence(state, cmd.attempt) is not None:
        return Decision(state, FailAnswer(FailOutcome.IGNORED))
    delay = policy.retry_delay(cmd.error.kind, state, cmd.retry_after or None)
    error = dataclasses.replace(cmd.error, retryable=delay is not None)
    if delay is None:
        failed = _step(state, Transition.FAIL, error=error, stage=Stage.FAILED, end_time=now)
        return _decided(state, FailAnswer(FailOutcome.FAILED), failed)
    retry = _step(
        state,
        Transition.RETRY,
        error=error,
        stage=Stage.WAITING_RETRY,
        next_attempt_time=now + int(delay * 1_000_000),
    )
    return _decided(state, FailAnswer(FailOutcome.RETRY, delay), retry)


def cancel(state: TaskState, cmd: Cancel, now: int) -> Decision[bool]:
    """CANCELLED unless already ended (then nothing changes). Answers whether an attempt was
    running (its worker must be told to abort)."""
    if state.status.terminal:
        return Decision(state, False)
    cancelled = _step(state, Transition.CANCEL, stage=Stage.CANCELLED, end_time=now)
    return _decided(state, state.status is Status.RUNNING, cancelled)


def rerun(state: TaskState, cmd: Rerun, now: int, policy: Policy) -> Decision[None]:
    """An operator's re-run of a FAILED task: QUEUED again with its error cleared, the attempt
    budget extended by a whole run, and a new job. Only FAILED: a cancelled task was stopped on
    purpose, a completed one has its result."""
    if state.status is not Status.FAILED:
        return Decision(state, Rejection(RejectReason.NOT_FAILED, state.status, state.attempt))
    gen = state.dispatch_gen + 1
    queued = _step(
        state,
        Transition.RERUN,
        stage=Stage.QUEUED,
        max_attempts=state.attempt + policy.max_attempts,
        error=None,
        end_time=None,
        lease_owner=None,
        dispatch_gen=gen,
    )
    return _decided(state, None, queued, dispatch=gen)


def redispatch(state: TaskState, cmd: Redispatch, now: int) -> Decision[bool]:
    """A new job for an unfinished task whose job the queue lost, unless somebody re-dispatched
    it since ``seen_gen``. No event: nothing changed for the client."""
    if state.status.terminal or state.dispatch_gen != cmd.seen_gen:
        return Decision(state, False)
    gen = cmd.seen_gen + 1
    return Decision(dataclasses.replace(state, dispatch_gen=gen), True, dispatch=gen)


def delete(state: TaskState, cmd: Delete, now: int) -> Decision[bool]:
    """Only an ended task may be removed (answer True: remove it, its events and its media); a
    queued or running one must be cancelled first, so no worker is left holding a job for a task
    that is gone."""
    if not state.status.terminal:
        return Decision(state, Rejection(RejectReason.NOT_FINISHED, state.status, state.attempt))
    return Decision(state, True)


def decide(state: TaskState, cmd: Command, now: int, policy: Policy) -> Decision[object]:
    """Any command (for property tests and generic callers; handlers call the rule directly)."""
    match cmd:
        case Claim():
            return claim(state, cmd, now, policy)
        case Report():
            return report(state, cmd, now, policy)
        case Complete():
            return complete(state, cmd, now)
        case Fail():
            return fail(state, cmd, now, policy)
        case Cancel():
            return cancel(state, cmd, now)
        case Rerun():
            return rerun(state, cmd, now, policy)
        case Redispatch():
            return redispatch(state, cmd, now)
        case Delete():
            return delete(state, cmd, now)
