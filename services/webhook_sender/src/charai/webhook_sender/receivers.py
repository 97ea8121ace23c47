"""Each receiver's share of a sender's slots (no I/O: the sender asks, a clock tells the time).

A receiver that hangs (answers nothing until the attempt's timeout) would otherwise take every
slot of a sender once it has that many deliveries due, and hold up every other tenant's for as
long. So a receiver gets at most ``limit`` attempts in flight at once, unless it is known to be
quick: its last attempt took less than ``slow_after`` seconds, within the last ``quick_for``
seconds, and none of its attempts in flight (claim, post and settle) is older than
``slow_after``. A receiver not seen
yet counts as not known to be quick, so a new one that hangs at once takes ``limit`` slots, not
all of them; a quick one may take them all. A delivery over the bound waits in JetStream
(:func:`park_delay`), not in a slot.

A receiver is a URL's host and port as the delivery's job names it (``WebhookJob.host``); a job
without one (from an older task_store) is never bounded.
"""

from __future__ import annotations

from charai.core.clock import Clock

#: A post longer than this makes its receiver slow, and so does an attempt in flight this long.
SLOW_AFTER_SECONDS = 2.0
#: A quick attempt vouches for its receiver this long.
QUICK_FOR_SECONDS = 60.0
#: The longest delay of a delivery put back to wait.
MAX_PARK_SECONDS = 30.0
#: Receivers whose last quick attempt is remembered, at most (the expired ones are dropped first).
MAX_REMEMBERED = 4096


def park_delay(delivered: int) -> float:
    """The delay of a delivery put back to wait, by how many times JetStream has delivered its
    job: 1, 2, 4 … seconds, at most :data:`MAX_PARK_SECONDS` (a receiver that stays slow is asked
    about less and less often)."""
    return min(MAX_PARK_SECONDS, float(2 ** min(max(delivered, 1) - 1, 5)))


class Receivers:
    """The attempts in flight to each receiver, and which receivers are quick (see the module)."""

    def __init__(
        self,
        limit: int,
        clock: Clock,
        *,
        slow_after: float = SLOW_AFTER_SECONDS,
        quick_for: float = QUICK_FOR_SECONDS,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._slow_after = slow_after
        self._quick_for = quick_for
        #: Start times of the attempts in flight, by receiver.
        self._started: dict[str, list[float]] = {}
        #: Until when each receiver counts as quick.
        self._quick_until: dict[str, float] = {}

    def in_flight(self, receiver: str) -> int:
        return len(self._started.get(receiver, ()))

    def admit(self, receiver: str) -> float | None:
        """Starts an attempt to ``receiver``: its start time (for :meth:`done`), or None if the
        receiver has its share already."""
        now = self._clock.monotonic()
        if not receiver or not self.limit:
            return now
        started = self._started.setdefault(receiver, [])
        if len(started) >= self.limit and not self._quick(receiver, started, now):
            if not started:
                del self._started[receiver]
            return None
        started.append(now)
        return now

    def done(self, receiver: str, started_at: float, post_seconds: float | None) -> None:
        """The attempt started at ``started_at`` ended; how long its post took says whether its
        receiver is quick (None: not posted, e.g. its claim said not now; the receiver was not
        asked, so this says nothing of it)."""
        if not receiver or not self.limit:
            return
        now = self._clock.monotonic()
        started = self._started.get(receiver)
        if started is not None:
            started.remove(started_at)
            if not started:
                del self._started[receiver]
        if post_seconds is None:
            return
        if post_seconds < self._slow_after:
            self._quick_until[receiver] = now + self._quick_for
            if len(self._quick_until) > MAX_REMEMBERED:
                self._forget(now)
        else:
            self._quick_until.pop(receiver, None)

    def _quick(self, receiver: str, started: list[float], now: float) -> bool:
        if self._quick_until.get(receiver, 0.0) <= now:
            return False
        return now - min(started) < self._slow_after

    def _forget(self, now: float) -> None:
        for receiver in [r for r, until in self._quick_until.items() if until <= now]:
            del self._quick_until[receiver]
        while len(self._quick_until) > MAX_REMEMBERED:
            del self._quick_until[next(iter(self._quick_until))]
