"""Estimated start and end times of tasks, from what a lane has done lately. Pure: times are
seconds on any clock the caller gives; nothing here reads one.

**Start.** A queued task at ``queue_position`` p starts once p tasks of its lane have started
(the p - 1 ahead of it, then itself), so with a lane starting tasks at a rate of r per second it
starts in about p / r seconds. The rate is measured, not configured: it already holds every
limit that applies (workers, the provider's admitted calls, the tenant's fair share as the
queue position counts it), which is why the estimate follows the lane when any of them changes.

**Rate.** The recent starts themselves: the last ``count`` starts within ``window`` seconds,
divided by the time from the oldest of them to now. A steady lane gives its rate after a few
starts (no warm-up, and no memory of an earlier busy spell to unlearn after an idle one), and a
lane that stops starting tasks sees its rate fall as ``now`` moves on, so its estimates grow
instead of staying optimistic.

**End.** A running task's end is its start plus the lane's recent mean run time; once it is
late, or its own progress says more (provider progress between 20 and 80 % moves with time),
the progress rate extrapolates instead.
"""

from __future__ import annotations

import collections
import dataclasses

#: Starts a lane's rate is measured over, at most, and how far back they may go (seconds).
DEFAULT_COUNT, DEFAULT_WINDOW = 64, 120.0
#: Progress at which the call starts (worker picked it up), and the end of the scale.
_PROGRESS_START, _PROGRESS_END = 10, 100


@dataclasses.dataclass(slots=True)
class StartRate:
    """Starts per second of one lane, from its recent starts (see the module docstring)."""

    count: int = DEFAULT_COUNT
    window: float = DEFAULT_WINDOW
    _starts: collections.deque[float] = dataclasses.field(default_factory=collections.deque)

    def observe(self, now: float, count: int = 1) -> None:
        """``count`` tasks started at ``now``."""
        for _ in range(min(count, self.count)):
            self._starts.append(now)
        while len(self._starts) > self.count:
            self._starts.popleft()

    def rate(self, now: float) -> float:
        """Starts per second lately; 0 when none were seen within the window."""
        while self._starts and self._starts[0] < now - self.window:
            self._starts.popleft()
        if not self._starts:
            return 0.0
        # At least a second: a burst of starts at one instant (free slots filling) is no rate.
        return len(self._starts) / max(now - self._starts[0], 1.0)


@dataclasses.dataclass(slots=True)
class MeanDuration:
    """Exponentially weighted mean of run times (seconds); each new one weighs ``alpha``."""

    alpha: float = 0.1
    value: float | None = None

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.value = seconds if self.value is None else self.value + self.alpha * (seconds - self.value)


def start_estimate(now: float, position: int, rate: float, not_before: float | None = None) -> float | None:
    """When a task queued at ``position`` (1-based) should start; None while the rate is
    unknown (no start seen) or ``position`` is not a queue place."""
    if position < 1 or rate <= 0:
        return None
    at = now + position / rate
    return at if not_before is None else max(at, not_before)


def end_estimate(now: float, started: float, progress: int, mean: float | None) -> float | None:
    """When a task that started at ``started`` and reached ``progress`` should end.

    The lane's mean run time says ``started + mean``; when the task has outlived that, or its
    progress is far enough along to say more, the progress rate since start extrapolates (never
    before ``now``). None when neither is known.
    """
    elapsed = max(0.0, now - started)
    by_mean = None if mean is None else started + mean
    done = (progress - _PROGRESS_START) / (_PROGRESS_END - _PROGRESS_START)
    by_progress = None
    if 0.1 <= done < 1 and elapsed > 0:
        by_progress = started + elapsed / done
    if by_mean is not None and by_mean > now:
        # Blend: trust the task's own progress more the further along it is.
        return by_mean if by_progress is None else by_mean + done * (by_progress - by_mean)
    if by_progress is not None:
        return max(now, by_progress)
    return None if by_mean is None else now + max(1.0, 0.1 * (mean or 0.0))
