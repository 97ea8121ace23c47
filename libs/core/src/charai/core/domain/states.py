"""Task statuses and the only legal transitions between them."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Lifecycle status of a task. Values equal the proto's TaskStatus numbers."""

    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def seed_name(self) -> str:
        """The seed's status string (``queued``, ``running``, ...)."""
        return self.name.lower()


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class EventType(enum.IntEnum):
    """What an event in a task's log records. Values equal the proto's TaskEventType numbers
    (the proto's SNAPSHOT and HEARTBEAT are stream messages, never stored, so absent here)."""

    QUEUED = 2
    STARTED = 3
    PROGRESS = 4
    RETRY_SCHEDULED = 5
    COMPLETED = 6
    FAILED = 7
    CANCELLED = 8


class Transition(enum.Enum):
    """Everything that can happen to an existing task, named after the event it produces.

    (Creation is not a transition: a task starts QUEUED, see ``lifecycle.create``.)
    """

    START = "started"  # a worker claimed it (or took over an attempt whose lease expired)
    PROGRESS = "progress"  # the running attempt reports progress
    RETRY = "retry_scheduled"  # the running attempt failed and another is scheduled
    COMPLETE = "completed"
    FAIL = "failed"
    CANCEL = "cancelled"
    RERUN = "queued"  # an operator re-runs a FAILED task (RetryTask): the one way out of a terminal state

    @property
    def event(self) -> EventType:
        """The event type this transition records."""
        return EventType[self.value.upper()]


_LEGAL: dict[Transition, frozenset[Status]] = {
    Transition.START: frozenset({Status.QUEUED, Status.RUNNING}),  # RUNNING: take over an expired lease
    Transition.PROGRESS: frozenset({Status.RUNNING}),
    Transition.RETRY: frozenset({Status.RUNNING}),
    Transition.COMPLETE: frozenset({Status.RUNNING}),
    Transition.FAIL: frozenset({Status.QUEUED, Status.RUNNING}),  # QUEUED: attempts exhausted on claim
    Transition.CANCEL: frozenset({Status.QUEUED, Status.RUNNING}),
    Transition.RERUN: frozenset({Status.FAILED}),
}

_TARGET: dict[Transition, Status] = {
    Transition.START: Status.RUNNING,
    Transition.PROGRESS: Status.RUNNING,
    Transition.RETRY: Status.QUEUED,
    Transition.COMPLETE: Status.COMPLETED,
    Transition.FAIL: Status.FAILED,
    Transition.CANCEL: Status.CANCELLED,
    Transition.RERUN: Status.QUEUED,
}


class IllegalTransitionError(Exception):
    """A transition that the state machine does not allow from the current status."""

    def __init__(self, status: Status, transition: Transition) -> None:
        super().__init__(f"cannot apply {transition.value!r} to a task that is {status.seed_name}")
        self.status = status
        self.transition = transition


def can_apply(status: Status, transition: Transition) -> bool:
    return status in _LEGAL[transition]


def apply(status: Status, transition: Transition) -> Status:
    """Returns the status after ``transition``; terminal statuses are final, except that an
    operator may re-run a FAILED task (:attr:`Transition.RERUN`)."""
    if not can_apply(status, transition):
        raise IllegalTransitionError(status, transition)
    return _TARGET[transition]


#: Progress milestones of the seed's table: 0 queued, 10 picked up, 20-80 provider call,
#: 90 result parsed / media stored, 100 completed.
PROGRESS_QUEUED = 0
PROGRESS_STARTED = 10
PROGRESS_CALL_START = 20
PROGRESS_CALL_END = 80
PROGRESS_PROCESSING = 90
PROGRESS_DONE = 100


class Stage:
    """Short words for the current step (the task's ``stage`` field)."""

    QUEUED = "queued"
    STARTING = "starting"
    GENERATING = "generating"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING_RETRY = "waiting_retry"


def clamp_progress(previous: int, reported: int) -> int:
    """Progress of a running attempt never goes backwards and stays inside 10..90."""
    bounded = max(PROGRESS_STARTED, min(PROGRESS_PROCESSING, reported))
    return max(previous, bounded)


def fenced(current_attempt: int, reported_attempt: int, status: Status) -> bool:
    """Whether a report from ``reported_attempt`` may change the task.

    Only the attempt that holds the task (the latest claim) may report; a stale worker whose
    lease was taken over, or a late duplicate delivery, is refused.
    """
    return status is Status.RUNNING and reported_attempt == current_attempt
