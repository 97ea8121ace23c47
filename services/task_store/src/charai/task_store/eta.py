"""What task_store has seen its lanes do, for the estimated start and end times of tasks
(:mod:`charai.core.domain.eta` has the arithmetic).

Fed with the events this replica commits (``started`` gives a lane's start rate, ``completed``
its run time), right after each commit, from whichever thread commits. With several replicas
each one measures the starts it committed itself: their claims are spread over the replicas,
so each one's rate is its share of the lane's, and estimates run long by about the number of
replicas (README, "Estimated times"; a shared measure is future work).
"""

from __future__ import annotations

import collections
import threading

from charai.core.domain.eta import MeanDuration, StartRate, end_estimate, start_estimate
from charai.core.domain.fairshare import MAX_BUFFER
from charai.core.timestamps import micros, set_micros
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2

_STARTED = task_pb2.TASK_EVENT_TYPE_STARTED
_COMPLETED = task_pb2.TASK_EVENT_TYPE_COMPLETED
_QUEUED = task_pb2.TASK_STATUS_QUEUED
_RUNNING = task_pb2.TASK_STATUS_RUNNING


class EtaBook:
    """Start rate and mean run time per task type; fills a task's estimates."""

    #: Starts remembered per type for :meth:`started_within`: the fair-share buffer's cap, which
    #: no count of recent starts can raise the buffer past.
    RECENT = MAX_BUFFER

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rates: dict[int, StartRate] = {}
        self._runs: dict[int, MeanDuration] = {}
        #: The latest starts' times (seconds) per task type, oldest first.
        self._recent: dict[int, collections.deque[float]] = {}

    def observe(self, envelopes: list[spb.EventEnvelope]) -> None:
        """Committed events: starts and completions update their lane's figures (called after
        every commit with all its events, so a lane's figures are made once, not per event)."""
        with self._lock:
            for envelope in envelopes:
                event = envelope.event
                etype = event.type
                if etype == _STARTED:
                    kind = int(event.task.type)
                    at = micros(event.time) / 1e6
                    rate = self._rates.get(kind)
                    if rate is None:
                        rate = self._rates[kind] = StartRate()
                    rate.observe(at)
                    recent = self._recent.get(kind)
                    if recent is None:
                        recent = self._recent[kind] = collections.deque(maxlen=self.RECENT)
                    recent.append(at)
                elif etype == _COMPLETED:
                    task = event.task
                    if not task.HasField("start_time"):
                        continue
                    seconds = (micros(task.end_time) - micros(task.start_time)) / 1e6
                    kind = int(task.type)
                    run = self._runs.get(kind)
                    if run is None:
                        run = self._runs[kind] = MeanDuration()
                    run.observe(seconds)

    def started_within(self, kind: int, now: float, seconds: float) -> int:
        """How many tasks of type ``kind`` this replica started in the last ``seconds``."""
        with self._lock:
            recent = self._recent.get(kind)
            if not recent:
                return 0
            since = now - seconds
            while recent and recent[0] < since:
                recent.popleft()
            return len(recent)

    def rate(self, kind: int, now: float) -> float:
        """Tasks of type ``kind`` started per second lately (0: none seen)."""
        with self._lock:
            found = self._rates.get(kind)
            return 0.0 if found is None else found.rate(now)

    def fill(self, task: task_pb2.Task, now: float) -> None:
        """Sets (or clears) ``estimated_start_time`` of a queued task, from its ``queue_position``
        (0: unknown, so only a scheduled retry's own time is known), and ``estimated_end_time``
        of a running one."""
        task.ClearField("estimated_start_time")
        task.ClearField("estimated_end_time")
        if task.status == _QUEUED:
            not_before = micros(task.next_attempt_time) / 1e6 if task.HasField("next_attempt_time") else None
            at = start_estimate(now, task.queue_position, self.rate(int(task.type), now), not_before)
            if at is None and not_before is not None and not_before > now:
                at = not_before  # a retry waiting for its time starts no earlier, whatever the queue
            if at is not None:
                set_micros(task.estimated_start_time, int(at * 1e6))
        elif task.status == _RUNNING and task.HasField("start_time"):
            with self._lock:
                run = self._runs.get(int(task.type))
                mean = None if run is None else run.value
            end = end_estimate(now, micros(task.start_time) / 1e6, task.progress, mean)
            if end is not None:
                set_micros(task.estimated_end_time, int(end * 1e6))
