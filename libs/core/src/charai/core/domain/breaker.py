"""The circuit breaker of one provider credential: pure state and transitions, no I/O.

Why a breaker: a refused key (PROVIDER_AUTH) or an empty account (QUOTA_EXHAUSTED) fails every
call the same way, and retrying cannot help. Without a breaker each task pays one provider call
to learn that; with it the first refusal opens the breaker for every worker sharing the
credential, and tasks fail at once with the same error and no call. After a backoff exactly one
call (the half-open probe, claimed by compare-and-set on the shared record) tries again: an
answer closes the breaker, another refusal reopens it with a doubled backoff.

Times are wall-clock seconds (:meth:`charai.core.clock.Clock.time`), because workers on other
machines read them from the shared record.
"""

from __future__ import annotations

import dataclasses
import enum

from charai.core.domain.errors import ErrorKind

#: The failures that open the breaker: retrying cannot help with either.
OPENING_KINDS = frozenset({ErrorKind.PROVIDER_AUTH, ErrorKind.QUOTA_EXHAUSTED})


class BreakerState(enum.StrEnum):
    """closed: calls go out; open: calls fail at once; half_open: one probe call is out."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(enum.Enum):
    """What :func:`admit` decided for one call."""

    PASS = "pass"  # the breaker is closed: call  # noqa: S105 - not a password
    REJECT = "reject"  # open (or another worker's probe is out): fail at once, no call
    PROBE = "probe"  # the backoff is over: this call may be the probe, if it wins the CAS


@dataclasses.dataclass(frozen=True, slots=True)
class Breaker:
    """One credential's breaker, as kept in its shared record.

    Attributes:
        state: see :class:`BreakerState`.
        reason: the :class:`ErrorKind` value that opened it (0 while closed).
        message: what a task failed by the open breaker is told (charai's own words: never the
            provider's message, which may quote part of the key).
        opened_at: when it (re)opened.
        retry_at: when the next half-open probe may go.
        backoff: the wait that gave ``retry_at``; doubled after each failed probe.
        probe: the holder id of the worker whose call is the probe (half-open only).
        probe_until: when that probe is presumed lost (its worker died) and may be taken over.
    """

    state: BreakerState = BreakerState.CLOSED
    reason: int = 0
    message: str = ""
    opened_at: float = 0.0
    retry_at: float = 0.0
    backoff: float = 0.0
    probe: str = ""
    probe_until: float = 0.0

    @property
    def kind(self) -> ErrorKind | None:
        """The error a call refused by this breaker fails with (``None`` while closed)."""
        return ErrorKind(self.reason) if self.reason else None


CLOSED = Breaker()


def admit(breaker: Breaker, now: float) -> Admission:
    """Whether a call may go: closed passes; open rejects until ``retry_at``, then offers the
    probe; half-open rejects unless the probe's worker has gone silent past ``probe_until``."""
    if breaker.state is BreakerState.CLOSED:
        return Admission.PASS
    if breaker.state is BreakerState.OPEN:
        return Admission.PROBE if now >= breaker.retry_at else Admission.REJECT
    return Admission.PROBE if now >= breaker.probe_until else Admission.REJECT


def start_probe(breaker: Breaker, holder: str, now: float, probe_timeout: float) -> Breaker | None:
    """The breaker with ``holder``'s call as the half-open probe, or ``None`` if no probe may
    start now (the caller re-checks this on the latest record inside its compare-and-set, so
    exactly one worker wins)."""
    if admit(breaker, now) is not Admission.PROBE:
        return None
    return dataclasses.replace(
        breaker, state=BreakerState.HALF_OPEN, probe=holder, probe_until=now + probe_timeout
    )


def opened(
    breaker: Breaker,
    kind: ErrorKind,
    message: str,
    now: float,
    *,
    probe_of: str = "",
    base: float,
    cap: float,
) -> Breaker:
    """The breaker after a call failed with ``kind`` (one of :data:`OPENING_KINDS`);
    ``probe_of`` is the worker's holder id when that call was the half-open probe.

    Closed: opens with the ``base`` backoff. The probe's own failure: reopens with the backoff
    doubled (at most ``cap``). Already open, or another call's failure while a probe is out: a
    straggler that was already in flight; the breaker stays as it is.
    """
    if kind not in OPENING_KINDS:
        raise ValueError(f"{kind.name} does not open a breaker")
    if breaker.state is BreakerState.CLOSED:
        backoff = base
    elif is_probe(breaker, probe_of):
        backoff = min(cap, max(base, breaker.backoff * 2))
    else:
        return breaker
    return Breaker(
        state=BreakerState.OPEN,
        reason=int(kind),
        message=message,
        opened_at=now,
        retry_at=now + backoff,
        backoff=backoff,
    )


def is_probe(breaker: Breaker, probe_of: str) -> bool:
    """Whether ``probe_of`` (a holder id, "" for a call that was no probe) is the current probe."""
    return bool(probe_of) and breaker.state is BreakerState.HALF_OPEN and breaker.probe == probe_of


def answered(breaker: Breaker, probe_of: str) -> Breaker:
    """The breaker after the probe was answered without an opening failure: the key works (and
    the account has quota again), so it closes. Only the probe closes it: a call that was already
    in flight when the breaker opened and succeeds afterwards proves nothing about quota."""
    return CLOSED if is_probe(breaker, probe_of) else breaker


def inconclusive(breaker: Breaker, probe_of: str, now: float) -> Breaker:
    """The probe ended without a verdict (timeout, unreachable, 5xx): open again with the same
    backoff, so the next probe is not delayed further for a failure of another kind."""
    if not is_probe(breaker, probe_of):
        return breaker
    return dataclasses.replace(
        breaker, state=BreakerState.OPEN, retry_at=now + breaker.backoff, probe="", probe_until=0.0
    )


def failure_message(kind: ErrorKind, key_setting: str, opened_at: str) -> str:
    """What a task failed by the open breaker reads (no provider text: it may quote the key)."""
    if kind is ErrorKind.PROVIDER_AUTH:
        what = "the provider refused the API key"
        fix = f"check {key_setting} and restart the workers"
    else:
        what = "the provider account has no balance or quota left"
        fix = "top up the account; the breaker retries by itself"
    return f"{what} (breaker open since {opened_at}, no call made); {fix}"
