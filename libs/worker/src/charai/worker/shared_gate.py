"""One provider credential's limiter and breaker, shared by every worker through NATS: this
process's side of it.

The shared record (:mod:`charai.core.domain.provider_record`) lives in a NATS KV bucket and
is kept in step by :class:`~charai.worker.gate_sync.GateSync` (compare-and-set writes, a KV
watch, heartbeats). :class:`SharedGate` decides here and now, without I/O on the call path:

* a call starts only while this worker's calls in flight stay within its *holding* (the
  slots of the shared limit it holds), no pause is in force, and the learned request rate
  has a token for it; otherwise it waits, first come first served. Waiters wake when the
  record changes (the watch: another worker gave slots back), when a pause ends (a timer to
  that instant, not polling), or when a call of this worker ends. Only the free slots
  proceed, in order: the end of a pause is no thundering herd.
* what a call teaches (a 429, successes while the limit binds, an auth or quota refusal) is
  applied at once to this worker's view, so its next calls already obey it, and queued for
  the next write, which applies it to the latest record.
* the breaker: while open, a call fails at once with the refusal's error kind and no provider
  call; when its backoff is over, the first call to win the compare-and-set is the probe.

When NATS is away, the gate falls back to a conservative local limit: the last known limit
divided by the workers known to share it (at least 1), lowered by local 429s; never more
than the shared limit allowed. It goes back to the shared record once a write succeeds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
from typing import TYPE_CHECKING

import structlog
from charai.core.clock import SYSTEM, Clock
from charai.core.domain import breaker as brk
from charai.core.domain import provider_limit as lim
from charai.core.domain import provider_record as rec
from charai.core.domain.errors import ErrorKind, ProviderFailure
from charai.core.domain.provider_events import (
    Answered,
    BreakerPolicy,
    Event,
    Inconclusive,
    RateLimited,
    Refused,
    Successes,
    TrialPassed,
    apply,
)
from charai.core.domain.provider_record import ProviderRecord
from charai.worker.gate import Slot, queue_waiter
from charai.worker.provider import ProviderError

if TYPE_CHECKING:
    from charai.worker.gate_sync import GateSync

log = structlog.get_logger("provider")

#: Seconds of call starts over which this worker's request rate is measured.
RATE_WINDOW = 10.0
#: The learned request rate allows bursts of this many seconds' worth of calls.
RATE_BURST_SECONDS = 0.25
#: Failures that show the key is accepted (the provider read the request).
_ANSWERS = frozenset({ErrorKind.CONTENT_REJECTED, ErrorKind.INVALID_REQUEST})


class SharedGate:
    """This worker's side of one credential's shared limiter and breaker (see the module doc).

    Args:
        base: the credential's identity (a record with no state yet): written when no record
            exists.
        holder: this worker's id in the record (unique per gate).
        key_setting: the setting named when the breaker opens for a refused key.
        policy: the breaker's backoff.
        lease: a holder not seen for this long is dropped (its slots go to the others).
    """

    def __init__(
        self,
        base: ProviderRecord,
        *,
        holder: str,
        key_setting: str,
        policy: BreakerPolicy | None = None,
        lease: float = 15.0,
        trial_seconds: float = lim.TRIAL_SECONDS,
        clock: Clock = SYSTEM,
    ) -> None:
        self.base = base
        self._trial_seconds = trial_seconds
        self.me = holder
        self._key_setting = key_setting
        self.policy = policy or BreakerPolicy()
        self.lease = lease
        self._clock = clock
        self._record: ProviderRecord | None = None
        self._record_rev = 0
        self._deleted_rev = 0
        self._events: list[Event] = []
        self._view = base
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[Slot]] = collections.deque()
        self._starts: collections.deque[float] = collections.deque()
        self._first_start: float | None = None
        self._successes = 0
        self._tokens = 1.0
        self._tokens_at = clock.monotonic()
        self._timer: asyncio.Task[None] | None = None
        self._timer_at = 0.0
        #: With NATS away: the local limit in force (``None``: unlimited, as the record allowed).
        self.degraded = False
        self._local_cap: int | None = None
        #: Set by the heartbeat: the next write goes out even if nothing else changed.
        self.heartbeat_due = False
        self.sync: GateSync | None = None

    # -- what ProviderHttp and the metrics read ------------------------------------------------
    @property
    def view(self) -> ProviderRecord:
        """The record as this worker sees it (the last one read, with its own news applied)."""
        return self._view

    @property
    def limit(self) -> int | None:
        """Calls allowed in flight cluster-wide (``None``: no limit learned yet)."""
        return lim.cap(self._view.limiter)

    @property
    def in_flight(self) -> int:
        """This worker's calls in flight."""
        return self._in_flight

    @property
    def local_limit(self) -> int | None:
        """Calls this worker may have in flight now: its part of the shared limit (``None``: no
        limit). What a job runner should size its claims by, rather than :attr:`limit`, the
        limit of every worker together."""
        return self._usable()

    @property
    def cluster_in_flight(self) -> int:
        """Calls in flight cluster-wide: this worker's now, the others' as they last wrote."""
        others = sum(h.in_flight for k, h in self._view.holders.items() if k != self.me)
        return others + self._in_flight

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def want(self) -> int:
        return self._in_flight + len(self._waiters)

    # -- the call path ---------------------------------------------------------------------------
    async def acquire(self) -> Slot:
        """Waits for a slot (first come, first served, but see ``gate.FIRST_TURN``) and takes it;
        pair with :meth:`release`.

        Raises:
            ProviderError: the breaker is open (the error kind that opened it, no call made).
        """
        self._admission()
        if not self._waiters and self._can_start():
            slot = self._start()
        else:
            waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
            queue_waiter(self._waiters, waiter)
            self._poke()
            try:
                slot = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self.release(waiter.result())  # handed over just as the wait was cancelled
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        try:  # the breaker may have opened, or its backoff ended, while this call waited
            if self._admission() is brk.Admission.PROBE:
                won = self.sync is not None and await self.sync.claim_probe()
                # Lost: another worker's call is the probe (rejected below), or the breaker
                # closed meanwhile (this is an ordinary call); no answer from NATS: no probe.
                if not won and self._admission() is not brk.Admission.PASS:
                    raise self._breaker_error()
                slot.probe = won
                if won:
                    log.info("provider_breaker_probe", credential=self.base.credential, model=self.base.model)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: Slot | None = None) -> None:
        self._in_flight -= 1
        if slot is not None and slot.trial is not None:
            slot.trial.cancel()
        self._hand_over()
        self._poke()

    def succeeded(self, slot: Slot | None = None) -> None:
        """A call holding ``slot`` was answered. Successes while the limit binds (counted with
        the call still in flight) are written once per holding's worth (about one write per
        round trip)."""
        probe = slot is not None and slot.probe
        if probe or not self._view.limiter.verified:
            self._event(Answered(probe=probe))
        if self._view.limiter.limit is None or not self._binding():
            return
        self._successes += 1
        mine = self._view.holders.get(self.me)
        if self._successes >= max(1, mine.held if mine else 1):
            self._event(Successes(self._successes))
            self._successes = 0

    def rejected(self, slot: Slot | None = None, retry_after: float | None = None) -> None:
        """A call holding ``slot`` was refused with a 429 (it still holds its slot)."""
        self._rate_limited(self._in_flight, retry_after)
        if slot is not None and slot.probe:
            self._event(Answered(probe=True))  # refused for its rate: the key itself is accepted

    def rejected_after_release(self) -> None:
        """A rate limit reported inside a 200 answer, seen after its call left its slot."""
        self._rate_limited(self._in_flight + 1, None)

    def failed(self, slot: Slot | None, failure: ProviderFailure) -> None:
        """A call failed otherwise: an auth or quota refusal opens the breaker; a rejected
        request still shows the key is accepted; the probe's other failures prove nothing."""
        probe = slot is not None and slot.probe
        now = self._clock.time()
        if failure.kind in brk.OPENING_KINDS:
            stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds")
            message = brk.failure_message(failure.kind, self._key_setting, stamp)
            self._event(Refused(failure.kind, message, now, probe))
        elif failure.kind in _ANSWERS:
            if probe or not self._view.limiter.verified:
                self._event(Answered(probe=probe))
        elif probe:
            self._event(Inconclusive(now))

    def _rate_limited(self, own_in_flight: int, retry_after: float | None) -> None:
        self._successes = 0
        self._event(RateLimited(own_in_flight, self._clock.time(), retry_after, self._own_rate()))
        if self.degraded:
            lowered = max(1, own_in_flight - 1)
            self._local_cap = lowered if self._local_cap is None else min(self._local_cap, lowered)

    # -- admission -------------------------------------------------------------------------------
    def _admission(self) -> brk.Admission:
        admission = brk.admit(self._view.breaker, self._clock.time())
        if admission is brk.Admission.REJECT or (admission is brk.Admission.PROBE and self.degraded):
            raise self._breaker_error()
        return admission

    def _breaker_error(self) -> ProviderError:
        breaker = self._view.breaker
        kind = breaker.kind or ErrorKind.PROVIDER_AUTH
        message = breaker.message or brk.failure_message(kind, self._key_setting, "now")
        return ProviderError(ProviderFailure(kind, message))

    def _usable(self) -> int | None:
        if self.degraded:
            return self._local_cap
        return rec.usable(self._view, self.me, self.want(), self._clock.time())

    def _binding(self) -> bool:
        """Whether the shared limit is what holds calls back now: the calls in flight of every
        worker add up to it. (A worker at its share while another leaves slots idle is held
        back by the split, not by the limit: growing the limit then would prove nothing.)"""
        cap = lim.cap(self._view.limiter)
        return cap is not None and self.cluster_in_flight >= cap

    def _can_start(self) -> bool:
        now = self._clock.time()
        paused = self._view.limiter.paused_until
        if paused > now:
            self._wake_after(paused - now)
            return False
        usable = self._usable()
        if usable is not None and self._in_flight >= usable:
            return False
        rate = self._local_rate(now)
        if rate is None:
            return True
        mono = self._clock.monotonic()
        burst = max(1.0, rate * RATE_BURST_SECONDS)
        self._tokens = min(burst, self._tokens + (mono - self._tokens_at) * rate)
        self._tokens_at = mono
        if self._tokens < 1.0:
            self._wake_after((1.0 - self._tokens) / rate)
            return False
        self._tokens -= 1.0
        return True

    def _local_rate(self, now: float) -> float | None:
        """This worker's part of the learned rate: in proportion to its part of the limit."""
        rate = lim.rate_at(self._view.limiter, now)
        cap = lim.cap(self._view.limiter)
        if rate is None or not cap:
            return None
        mine = self._view.holders.get(self.me)
        part = self._local_cap if self.degraded and self._local_cap else (mine.held if mine else 1)
        return rate * max(1, min(part, cap)) / cap

    def _start(self) -> Slot:
        self._in_flight += 1
        mono = self._clock.monotonic()
        self._starts.append(mono)
        while self._starts and self._starts[0] < mono - RATE_WINDOW:
            self._starts.popleft()
        if self._first_start is None:
            self._first_start = mono
        slot = Slot()
        if not self._view.limiter.verified:
            slot.trial = asyncio.create_task(self._trial(), name="provider-trial")
        return slot

    async def _trial(self) -> None:
        """A call of an unverified credential still running after ``trial_seconds``
        (:func:`~charai.core.domain.provider_limit.trial_window`) got past authentication: the
        key is accepted, the other calls need not wait for its answer."""
        await self._clock.sleep(self._trial_seconds)
        if not self._view.limiter.verified:
            self._event(TrialPassed())

    def _own_rate(self) -> float | None:
        """Calls per second this worker started over the last RATE_WINDOW (``None`` before it
        has been calling that long: the burst of a start says nothing about a rate, and a rate
        read from it, calls over the whole window, would be far too low)."""
        mono = self._clock.monotonic()
        if self._first_start is None or mono - self._first_start < RATE_WINDOW:
            return None
        return sum(1 for t in self._starts if t >= mono - RATE_WINDOW) / RATE_WINDOW

    def _hand_over(self) -> None:
        if self._waiters and brk.admit(self._view.breaker, self._clock.time()) is brk.Admission.REJECT:
            error = self._breaker_error()
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
            return
        while self._waiters:
            if self._waiters[0].done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._can_start():
                return
            self._waiters.popleft().set_result(self._start())

    def _wake_after(self, delay: float) -> None:
        """Hands over again ``delay`` seconds from now (the end of a pause, the next token)."""
        at = self._clock.monotonic() + delay
        if self._timer is not None and not self._timer.done() and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.create_task(self._wake(delay), name="provider-gate-wake")

    async def _wake(self, delay: float) -> None:
        await self._clock.sleep(delay)
        self._timer = None
        self._hand_over()
        self._poke()

    # -- what GateSync calls ------------------------------------------------------------------------
    def _event(self, event: Event) -> None:
        self._events.append(event)
        self._view = apply(self._view, self.me, event, self.policy)
        self._hand_over()
        self._poke()

    def _poke(self) -> None:
        if self.sync is not None:
            self.sync.poke()

    def current(self) -> tuple[ProviderRecord | None, int]:
        """The last record read and its revision (``(None, 0)``: none exists)."""
        return self._record, self._record_rev

    def pending(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def accept(self, revision: int, record: ProviderRecord | None) -> None:
        """A record read (watch, load or own write) at ``revision``; older ones are ignored."""
        if record is None:
            if revision >= self._record_rev:
                self._record, self._record_rev, self._deleted_rev = None, 0, revision
                self._refresh()
            return
        if revision <= self._record_rev or revision <= self._deleted_rev:
            return
        self._record, self._record_rev = record, revision
        self._refresh()

    def forget(self) -> None:
        """The key has no record (expired, or never written): the next write creates it."""
        self._record, self._record_rev = None, 0
        self._refresh()

    def written(self, revision: int, record: ProviderRecord, events: int) -> None:
        """This worker's write of ``record`` succeeded, with the first ``events`` pending ones."""
        del self._events[:events]
        self.heartbeat_due = False
        self.accept(revision, record)

    def compose(self, current: ProviderRecord | None, events: tuple[Event, ...]) -> ProviderRecord:
        """What this worker writes over ``current``: crashed holders dropped, its events
        applied, its holding as it should be."""
        now = self._clock.time()
        record = (current or self.base).live(now, self.lease)
        for event in events:
            record = apply(record, self.me, event, self.policy)
        return rec.allot(record, self.me, in_flight=self._in_flight, want=self.want(), now=now)

    def needs_write(self) -> bool:
        """Whether the record should be written now (see the module doc for when)."""
        if self._events or self.heartbeat_due or self._record is None or self.degraded:
            return True
        mine = self._view.holders.get(self.me)
        if mine is None:
            return True
        now, want = self._clock.time(), self.want()
        live = self._view.live(now, self.lease)
        desired = rec.allot(live, self.me, in_flight=self._in_flight, want=want, now=now).holders[self.me]
        if desired.held != mine.held or (want > mine.held) != (mine.want > mine.held):
            return True
        return lim.cap(self._view.limiter) is None and abs(want - mine.want) >= max(2, mine.want // 4)

    def degrade(self, reason: str) -> None:
        """NATS is away: the local limit takes over (see the module doc)."""
        if self.degraded:
            return
        cap = lim.cap(self._view.limiter)
        workers = max(1, len(self._view.holders))
        self._local_cap = None if cap is None else max(1, cap // workers)
        self.degraded = True
        log.warning(
            "provider_limit_local",
            credential=self.base.credential,
            model=self.base.model,
            reason=reason,
            local_limit=self._local_cap,
        )
        self._hand_over()  # waiters held back for a write that cannot happen go on locally

    def recover(self) -> None:
        if self.degraded:
            self.degraded = False
            log.info("provider_limit_shared_again", credential=self.base.credential, model=self.base.model)
            self._hand_over()

    def _refresh(self) -> None:
        view = self._record or self.base
        for event in self._events:
            view = apply(view, self.me, event, self.policy)
        self._view = view
        self._hand_over()
        self._poke()

    def close(self) -> None:
        """Stops the wake timer and fails nobody: waiters are the callers' to cancel."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
