"""One provider's adaptive limit on this process's calls in flight (AIMD): a 429 makes the
worker send fewer calls at once to that provider instead of stopping them all."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
from typing import Protocol, TypeVar

from charai.core.domain.errors import ProviderFailure

#: Set (in a job's task) while it runs a tenant's first turn, handed to this worker's claim by
#: task_store's fair share (ClaimTaskRequest.any_task): its calls wait at the gate before the
#: calls of jobs claimed earlier, so the tenant waits one slot's turn, not this worker's prefetch.
FIRST_TURN: contextvars.ContextVar[bool] = contextvars.ContextVar("charai_first_turn", default=False)

W = TypeVar("W")


def queue_waiter(waiters: collections.deque[W], waiter: W) -> None:
    """Adds a call waiting for a slot: last, or first while it runs a first turn (``FIRST_TURN``)."""
    if FIRST_TURN.get():
        waiters.appendleft(waiter)
    else:
        waiters.append(waiter)


@dataclasses.dataclass(eq=False)
class Slot:
    """One call's place at a gate that tells calls apart (the shared gate): whether the call is
    the breaker's half-open probe, and the timer that vouches for an unverified key."""

    probe: bool = False
    trial: asyncio.Task[None] | None = None


class Gate(Protocol):
    """What :class:`~charai.worker.http.ProviderHttp` needs of a gate: this per-process one, or
    the one shared by every worker through NATS (:class:`~charai.worker.shared_gate.SharedGate`).

    A call takes a slot (:meth:`acquire`, which may also refuse it at once: an open breaker),
    reports how it went (:meth:`succeeded`, :meth:`rejected` for a 429, :meth:`failed` for any
    other failure), then gives the slot back (:meth:`release`).
    """

    @property
    def limit(self) -> int | None: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    async def acquire(self) -> Slot | None: ...

    def release(self, slot: Slot | None = None) -> None: ...

    def succeeded(self, slot: Slot | None = None) -> None: ...

    def rejected(self, slot: Slot | None = None, retry_after: float | None = None) -> None: ...

    def failed(self, slot: Slot | None, failure: ProviderFailure) -> None: ...

    def rejected_after_release(self) -> None: ...


class ProviderGate:
    """An adaptive limit on this process's calls in flight to one provider (AIMD).

    A provider's 429 is almost always its concurrency limit speaking (Zhipu limits concurrent
    requests per account), so the answer is to send fewer calls at once, not to stop sending:
    the limit follows what the provider admits, and only the calls beyond it wait, in order of
    arrival. The call that was refused waits out its own Retry-After (:meth:`ProviderHttp.request`);
    the others carry on.

    * Decrease: a 429 sets the limit to the calls in flight at that moment minus one (the refused
      call itself), floor 1, never raising it. A burst of N refusals out of M calls in flight
      lowers it once per refused call, but each refused call has left the count before the next
      one is seen, so the burst ends at M - N, the calls the provider accepted: the limit never
      compounds below that, as a multiplicative cut per 429 would.
    * Increase: after ``limit`` successful calls in a row without a 429 (about one round trip of
      calls at the limit), the limit grows by one, up to ``ceiling``; probing upward is how it
      finds out the provider admits more again. Only successes while the limit binds count (the
      limit's worth of calls in flight, or calls waiting): in a lull the limit proves nothing,
      and drifting up then would cost the next burst its 429s all over again.

    Until the first 429 there is no limit (or ``ceiling``): the worker's own concurrency bounds
    the calls, and one round of refusals teaches the gate the provider's limit.
    """

    def __init__(self, ceiling: int | None = None) -> None:
        if ceiling is not None and ceiling < 1:
            raise ValueError("ceiling must be >= 1 or None")
        self._ceiling = ceiling
        self._limit = ceiling
        self._in_flight = 0
        self._successes = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int | None:
        """Calls allowed in flight at once; ``None`` while unlimited (no 429 seen, no ceiling)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Calls queued for a slot."""
        return len(self._waiters)

    def _has_room(self) -> bool:
        return self._limit is None or self._in_flight < self._limit

    async def acquire(self) -> None:
        """Waits for a slot (first come, first served, but see ``FIRST_TURN``) and takes it; pair
        with :meth:`release`."""
        if not self._waiters and self._has_room():
            self._in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        queue_waiter(self._waiters, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):  # already dropped by _hand_over
                    self._waiters.remove(waiter)
            raise

    def release(self, slot: Slot | None = None) -> None:
        self._in_flight -= 1
        self._hand_over()

    def rejected(self, slot: Slot | None = None, retry_after: float | None = None) -> None:
        """A call holding a slot was refused with a rate limit: fewer calls at once from now on.
        (Its Retry-After is the refused call's own wait, in :meth:`ProviderHttp.request`.)"""
        self._shrink(self._in_flight - 1)

    def failed(self, slot: Slot | None, failure: ProviderFailure) -> None:
        """Another failure: nothing to learn for the in-flight limit (this gate has no breaker)."""

    def succeeded(self, slot: Slot | None = None) -> None:
        """A call holding a slot was answered: after ``limit`` of these in a row, one more slot."""
        if self._limit is None or self._limit == self._ceiling:
            return
        if self._in_flight < self._limit and not self._waiters:
            return
        self._successes += 1
        if self._successes >= self._limit:
            self._limit += 1
            self._successes = 0
            self._hand_over()

    def rejected_after_release(self) -> None:
        """A rate limit reported outside :meth:`ProviderHttp.request` (a 429-class code inside a
        200 answer, seen after the call left its slot): lowered like a 429, to the calls still in
        flight. The refused task's own retry (with its Retry-After) is the store's to schedule."""
        self._shrink(self._in_flight)

    def _shrink(self, target: int) -> None:
        target = max(1, target)
        if self._limit is None or target < self._limit:
            self._limit = target
        self._successes = 0

    def _hand_over(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)
