"""How long Python's cyclic garbage collector stops a process: ``charai_gc_pause_seconds``.

One ``gc.callbacks`` hook per process counts each collection's wall time, by generation, into
plain counters; every :class:`charai.core.metrics.Metrics` registry shows them as a histogram
when it is scraped. Why not a prometheus-client ``Histogram`` fed by the hook: its ``observe``
takes a lock, and a collection may start at any allocation, including one made in the same
thread while a scrape holds that lock. The hook takes no lock; a scrape may read a collection
half-counted, which the next scrape corrects.

What the tuning of :func:`charai.core.lifecycle.settle_gc` (``CHARAI_GC_THRESHOLD``) changes
shows here: fewer collections, and no long full ones.
"""

from __future__ import annotations

import bisect
import functools
import gc
import itertools
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

#: Seconds: a young collection takes well under a millisecond; a full one of a large heap, 100 ms.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
GENERATIONS = 3
_BOUNDS = [str(bound) for bound in BUCKETS] + ["+Inf"]


class _Pauses:
    """The hook: counts per generation and bucket (the last one past every bound), and sums."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(GENERATIONS)]
        self.sums = [0.0] * GENERATIONS
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = int(info["generation"])
        self.sums[generation] += seconds
        self.counts[generation][bisect.bisect_left(BUCKETS, seconds)] += 1


@functools.cache
def pauses() -> _Pauses:
    """This process's hook, installed on first use."""
    hook = _Pauses()
    gc.callbacks.append(hook)
    return hook


class GcPauseCollector(Collector):
    """The hook's counts as the ``charai_gc_pause_seconds`` histogram, at each scrape."""

    def __init__(self) -> None:
        self._pauses = pauses()

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "charai_gc_pause_seconds",
            "Collections of Python's garbage collector, by generation (the process stands still)",
            labels=["generation"],
        )
        for generation in range(GENERATIONS):
            cumulative = list(itertools.accumulate(self._pauses.counts[generation]))
            family.add_metric(
                [str(generation)],
                buckets=list(zip(_BOUNDS, cumulative, strict=True)),
                sum_value=self._pauses.sums[generation],
            )
        yield family
