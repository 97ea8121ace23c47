"""The bound on a worker's task_store calls in flight."""

from __future__ import annotations

import asyncio
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
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        #: Calls in flight now, and the most at once (metrics and tests).
        self.in_flight = 0
        self.peak = 0

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, once a slot is free."""
        async with self._slots:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await call()
            finally:
                self.in_flight -= 1
