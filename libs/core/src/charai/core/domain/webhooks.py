"""Webhook delivery rules, free of I/O: which events a webhook wants, how an answer is judged,
when the next attempt is due, and when an endpoint is disabled.

The store applies these inside its transactions (``charai.task_store.webhooks``); the sender
only reports what the receiver answered. Times are seconds; ``rng`` is injected so tests can
pin the jitter.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Iterable, Sequence

from charai.core.domain.states import EventType

#: The names a webhook's ``events`` may hold, and the task events they stand for.
EVENT_NAMES: dict[str, EventType] = {
    "started": EventType.STARTED,
    "progress": EventType.PROGRESS,
    "completed": EventType.COMPLETED,
    "failed": EventType.FAILED,
    "cancelled": EventType.CANCELLED,
}
#: What a webhook without ``events`` delivers.
DEFAULT_EVENTS: tuple[str, ...] = ("completed", "failed", "cancelled")
_TYPE_NAMES = {v: k for k, v in EVENT_NAMES.items()}

#: Delay before each attempt, the first included (seconds): roughly immediately, 5 s, 5 min,
#: 30 min, 2 h, 5 h, 10 h, 10 h. The delivery fails for good after the last one.
SCHEDULE: tuple[float, ...] = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
#: Each delay is moved by up to this fraction either way, so endpoints that failed together
#: are not retried together.
JITTER = 0.1
#: The longest ``Retry-After`` honoured (a larger one is cut to this).
MAX_RETRY_AFTER = 36000.0


def parse_events(names: Iterable[str]) -> frozenset[EventType]:
    """The task events a webhook's ``events`` subscribe to; ValueError names an unknown one."""
    wanted = list(names) or list(DEFAULT_EVENTS)
    unknown = [n for n in wanted if n not in EVENT_NAMES]
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r}: use {', '.join(EVENT_NAMES)}")
    return frozenset(EVENT_NAMES[n] for n in wanted)


def payload_type(event_type: int) -> str:
    """The payload's ``type`` of a task event: ``task.completed`` …"""
    return f"task.{_TYPE_NAMES[EventType(event_type)]}"


def is_progress(event_type: int) -> bool:
    return event_type == EventType.PROGRESS


class Verdict(enum.Enum):
    """What an answer (or its absence) means for a delivery."""

    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # no answer, 408, 429, 5xx: try again on the schedule
    FINAL = "final"  # 3xx (redirects are not followed) and other 4xx: the receiver refused it
    GONE = "gone"  # 410: the receiver wants no more; its endpoint is disabled


def judge(http_status: int) -> Verdict:
    """The verdict of an HTTP status; 0 stands for no answer (connection error, timeout), a
    negative one for an attempt refused before sending (the URL's host is not allowed)."""
    if http_status < 0:
        return Verdict.FINAL
    if http_status == 0 or http_status in (408, 429) or http_status >= 500:
        return Verdict.RETRY
    if 200 <= http_status < 300:
        return Verdict.DELIVERED
    if http_status == 410:
        return Verdict.GONE
    return Verdict.FINAL


class DeliveryStatus(enum.IntEnum):
    """Values equal the proto's ``WebhookDeliveryStatus``."""

    PENDING = 1
    DELIVERED = 2
    FAILED = 3


@dataclasses.dataclass(frozen=True, slots=True)
class AfterAttempt:
    """The decision after one attempt."""

    status: DeliveryStatus
    #: Seconds until the next attempt (with ``PENDING``), else None.
    retry_in: float | None
    #: The endpoint's consecutive failures after this attempt.
    streak: int
    #: Disable the endpoint (410, or ``streak`` reached the limit).
    disable: bool


def delay_before(attempt: int, schedule: Sequence[float], rng: random.Random) -> float | None:
    """The jittered delay before the ``attempt``-th attempt (1-based), None past the schedule."""
    if attempt > len(schedule):
        return None
    base = schedule[attempt - 1]
    return base * (1 + rng.uniform(-JITTER, JITTER)) if base > 0 else 0.0


def after_attempt(
    attempts: int,
    http_status: int,
    retry_after: float | None,
    streak: int,
    *,
    disable_after: int,
    schedule: Sequence[float] = SCHEDULE,
    rng: random.Random | None = None,
) -> AfterAttempt:
    """Decides what follows the ``attempts``-th attempt, answered ``http_status``.

    ``retry_after``: the receiver's ``Retry-After`` (seconds), honoured as a lower bound of the
    next delay. ``streak``: the endpoint's consecutive failures before this attempt; it is
    disabled once it reaches ``disable_after`` (0: never for a streak).
    """
    verdict = judge(http_status)
    if verdict is Verdict.DELIVERED:
        return AfterAttempt(DeliveryStatus.DELIVERED, None, 0, False)
    streak += 1
    disable = verdict is Verdict.GONE or (disable_after > 0 and streak >= disable_after)
    if verdict is not Verdict.RETRY or disable:
        return AfterAttempt(DeliveryStatus.FAILED, None, streak, disable)
    delay = delay_before(attempts + 1, schedule, rng or random.Random())
    if delay is None:
        return AfterAttempt(DeliveryStatus.FAILED, None, streak, False)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return AfterAttempt(DeliveryStatus.PENDING, delay, streak, False)


def wanted(events: frozenset[EventType], event_type: int) -> bool:
    """Whether a webhook subscribed to ``events`` gets an event of ``event_type``."""
    return event_type in events
