"""Time as a collaborator: every component whose behaviour depends on time takes a :class:`Clock`.

Why: leases, retry delays, outbox claims, sweeps and rate limits are decided by comparing times.
Reading the wall clock from a module function makes those rules testable only by sleeping (slow,
and flaky on a busy machine). With a clock passed in, production uses :data:`SYSTEM` and tests use
:class:`ManualClock`, which they move forward explicitly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock and monotonic time, and sleeping on the same time line."""

    def time(self) -> float:
        """Seconds since the Unix epoch (wall clock: stored timestamps, leases shared by replicas)."""
        ...

    def now_us(self) -> int:
        """:meth:`time` in whole microseconds (how the store keeps timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals inside one process)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns once ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """The real clocks of this machine."""

    def time(self) -> float:
        return time.time()

    def now_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


#: The clock every service uses unless a test passes another.
SYSTEM: Clock = SystemClock()


class ManualClock:
    """A clock that moves only when told to (tests).

    ``advance(s)`` moves the wall clock and the monotonic clock together and wakes every
    :meth:`sleep` whose time has come, in deadline order. Both clocks start at given values so a
    test can tell stored times apart from real ones. With ``tick``, every wall-clock read moves
    the wall clock on by that much, so things created one after the other get increasing times
    (as they do on a real clock) while the test still decides when a lease or a delay is over.
    """

    def __init__(
        self, start: float = 1_800_000_000.0, monotonic_start: float = 1_000.0, *, tick: float = 0.0
    ) -> None:
        self._wall = start
        self._mono = monotonic_start
        self._tick = tick
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        now = self._wall
        self._wall += self._tick
        return now

    def now_us(self) -> int:
        return round(self.time() * 1_000_000)

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many :meth:`sleep` calls are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        """Moves time forward by ``seconds`` and wakes the sleepers that are due."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += seconds
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
