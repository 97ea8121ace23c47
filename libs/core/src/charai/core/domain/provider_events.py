"""What a worker learned from one provider call, and how it changes the shared record: pure.

A worker applies each event at once to its own view of the record (so its next calls already
obey it) and again, on the latest record, inside its next compare-and-set write (so no other
worker's change is lost). Applying an event twice is never needed: a write that loses the race
re-applies the same events to the newer record.
"""

from __future__ import annotations

import dataclasses

from charai.core.domain import breaker as brk
from charai.core.domain import provider_limit as lim
from charai.core.domain.errors import ErrorKind
from charai.core.domain.provider_record import ProviderRecord, others_in_flight


@dataclasses.dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Backoff of the breaker: ``base`` seconds before the first probe, doubled after each
    failed probe up to ``cap``; a probe not heard of for ``probe_timeout`` is presumed lost."""

    base: float = 30.0
    cap: float = 900.0
    probe_timeout: float = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimited:
    """A 429. ``own_in_flight``: this worker's calls in flight then, the refused one included;
    ``own_rate``: calls per second this worker started lately (``None``: not known)."""

    own_in_flight: int
    at: float
    retry_after: float | None = None
    own_rate: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Successes:
    """``count`` calls answered while the limit bound (calls were waiting for a slot)."""

    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    """A call was answered in a way that shows the key is accepted (``probe``: it was the
    half-open probe, so the breaker closes)."""

    probe: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """A call failed with PROVIDER_AUTH or QUOTA_EXHAUSTED: the breaker opens."""

    kind: ErrorKind
    message: str
    at: float
    probe: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Inconclusive:
    """The probe ended without a verdict (timeout, 5xx, unreachable)."""

    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class TrialPassed:
    """The trial call of an unverified credential has run for TRIAL_SECONDS unrefused."""


Event = RateLimited | Successes | Answered | Refused | Inconclusive | TrialPassed


def apply(record: ProviderRecord, me: str, event: Event, policy: BreakerPolicy) -> ProviderRecord:
    """``record`` after ``event`` reported by holder ``me``."""
    limiter, breaker = record.limiter, record.breaker
    probe_of = me if getattr(event, "probe", False) else ""
    match event:
        case RateLimited(own_in_flight=own, at=at, retry_after=retry_after, own_rate=own_rate):
            in_flight = own + others_in_flight(record, me)
            admitted_rate = own_rate * in_flight / own if own_rate and own > 0 else None
            limiter = lim.rate_limited(limiter, in_flight, at, retry_after, admitted_rate)
        case Successes(count=count):
            limiter = lim.succeeded(limiter, count)
        case Answered():
            limiter = lim.verified(limiter)
            breaker = brk.answered(breaker, probe_of)
        case Refused(kind=kind, message=message, at=at):
            breaker = brk.opened(
                breaker, kind, message, at, probe_of=probe_of, base=policy.base, cap=policy.cap
            )
        case Inconclusive(at=at):
            breaker = brk.inconclusive(breaker, me, at)
        case TrialPassed():
            limiter = lim.verified(limiter)
    return record.with_limiter(limiter).with_breaker(breaker)
