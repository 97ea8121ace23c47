"""When a supervisor restarts a process that died, and when it gives up: pure decisions (times are
passed in), shared by ``make run``'s supervisor (:mod:`charai.devstack.supervisor`) and the
gateway's parent process (:mod:`charai.gateway.processes`), so both back off the same way.

A process that dies is restarted after a backoff (0.5 s, doubling up to 10 s; back to 0.5 s once
it has stayed up 30 s). One that keeps crashing before it ever becomes ready (5 times in a row
within a minute) will not be fixed by restarting it: the supervisor gives up and says why.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """When to restart a process that died, and when to give up on it."""

    #: Backoff before the first restart; it doubles with each crash up to ``max_delay``.
    first_delay: float = 0.5
    max_delay: float = 10.0
    #: A process that stayed up (ready) this long starts from ``first_delay`` again.
    stable_after: float = 30.0
    #: This many crashes in a row before becoming ready, within ``start_crash_window`` seconds,
    #: and the supervisor gives up.
    max_start_crashes: int = 5
    start_crash_window: float = 60.0
    #: How long a (re)started process may take to become ready; past that it counts as a crash
    #: at start (and is killed).
    ready_timeout: float = 60.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do after a crash: restart after ``delay`` seconds, or give up."""

    give_up: bool
    delay: float = 0.0
    start_crashes: int = 0


class RestartTracker:
    """The restart decisions for one process: pure (times are passed in), so tested without a
    process or a loop."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._delay = policy.first_delay
        self._ready_at: float | None = None
        self._start_crashes: list[float] = []

    def started(self) -> None:
        """A new process was spawned: it is not ready yet."""
        self._ready_at = None

    def ready(self, now: float) -> None:
        self._ready_at = now
        self._start_crashes.clear()

    def crashed(self, now: float) -> Verdict:
        """The process exited (or never became ready) at ``now``."""
        p = self.policy
        if self._ready_at is None:
            self._start_crashes = [t for t in self._start_crashes if now - t < p.start_crash_window]
            self._start_crashes.append(now)
            if len(self._start_crashes) >= p.max_start_crashes:
                return Verdict(give_up=True, start_crashes=len(self._start_crashes))
        elif now - self._ready_at >= p.stable_after:
            self._delay = p.first_delay  # it had been fine for a while: this is a new incident
        delay = self._delay
        self._delay = min(self._delay * 2, p.max_delay)
        self._ready_at = None
        return Verdict(give_up=False, delay=delay, start_crashes=len(self._start_crashes))
