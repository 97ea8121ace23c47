"""The bound on a worker's task_store calls in flight."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class StoreCalls:
    """Runs task_store calls (claims, reports, outcomes), at most ``limit`` of them at once.

    Why: with 1,000 jobs in flight their claims, reports and outcomes come in bursts (a batch
    of jobs starts together, their calls return together); queued here each costs a waiting
    coroutine, queued in the gRPC core each costs a call's native buffers, most of a worker's
    memory per job in ``make bench`` B3. task_store answers them a commit batch at a time,
    so the bound costs no throughput. The hand-back at shutdown bypasses it (it must not wait
    behind calls that are stuck on an unreachable task_store).

    A freed slot goes to a waiting claim or outcome before any waiting progress report
    (``report=True``), each kind first come, first served. Every job that starts sends a report
    at once, so in a burst of starts the reports of the jobs already running stood in line
    before the claims of the next ones, which started later (bench B3 at 1,000 in flight). A
    report only informs watchers; the heartbeat's lease renewals go as claims do (a store that
    cannot keep up with the claims could hold the reports back for as long as that lasts).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        #: Callers waiting for a slot: claims and outcomes, then progress reports.
        self._waiting: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(),
            collections.deque(),
        )
        #: Calls in flight now, and the most at once (metrics and tests).
        self.in_flight = 0
        self.peak = 0

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return sum(len(queue) for queue in self._waiting)

    async def run(self, call: Callable[[], Awaitable[T]], *, report: bool = False) -> T:
        """``call()``, once a slot is free."""
        if self.in_flight >= self._limit:
            queue = self._waiting[1 if report else 0]
            turn = asyncio.get_running_loop().create_future()
            queue.append(turn)
            try:
                await turn  # the call that ended handed its slot over: in_flight counts it
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed over, then cancelled before it ran: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        queue.remove(turn)
                raise
        else:
            self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await call()
        finally:
            self._release()

    def _release(self) -> None:
        for queue in self._waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self.in_flight -= 1
