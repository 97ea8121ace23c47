"""A pushed create's unit of work, timed where it runs: ``python -m bench.push_unit [--n N]``.

B1's path in task_store without gRPC: on a fresh SQLite store in this process (task_store's own
settings: reuse on, a fair-share buffer of 64) a worker's standing offer (push dispatch) has a
slot free for every create, and N creates go one at a time, each its own unit of work (claimed
for the offer in its own transaction, as in B1), each completed afterwards in a unit of its own
(so the table holds what B1's holds: ended tasks, none running). Prints, for the creates only:

- the unit's time on the database thread (its statements and its Python; not BEGIN or COMMIT),
  p50 and p90, and the whole call (queue, unit, COMMIT, answer) p50;
- each statement's time in place, per create;
- the reuse key (pure Python: JSON and SHA-256) timed three times in a row inside the unit, and
  the same call in a tight loop: how much slower code runs in place, once per request, than in a
  loop (the "Data plane v2, thirteenth pass" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

from charai.store.v1 import store_service_pb2 as spb
from charai.task_store import reuse, sqlite_backend
from charai.task_store.backlog import FairConfig
from charai.task_store.push import Outlet
from charai.task_store.reuse import ReuseConfig
from charai.task_store.store import StoreConfig, TaskStore
from charai.tasks.v1 import task_pb2

from bench.common import pct
from bench.ours import tts_request

WARMUP = 200


class Timings:
    """What the patched functions record while ``creating`` is set."""

    def __init__(self) -> None:
        self.creating = False
        self.units: list[float] = []
        self.statements: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.keys: list[tuple[float, float, float]] = []

    def patch(self) -> None:
        run = sqlite_backend.run_to_completion

        def timed_unit(coro: Any) -> Any:
            start = time.perf_counter()
            try:
                return run(coro)
            finally:
                if self.creating:
                    self.units.append(time.perf_counter() - start)

        sqlite_backend.run_to_completion = timed_unit
        for name in ("execute", "executemany", "fetchrow"):
            setattr(sqlite_backend.SqliteTx, name, self._timed(getattr(sqlite_backend.SqliteTx, name)))
        key = reuse.Reuse.key

        def timed_key(store: reuse.Reuse, tenant: str, task: task_pb2.Task) -> str | None:
            marks = [time.perf_counter()]
            for _ in range(3):
                found = key(store, tenant, task)
                marks.append(time.perf_counter())
            if self.creating:
                self.keys.append((marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2]))
            return found

        reuse.Reuse.key = timed_key  # type: ignore[method-assign]

    def _timed(self, method: Any) -> Any:
        async def timed(tx: Any, sql: str, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return await method(tx, sql, *args)
            finally:
                if self.creating:
                    self.statements[" ".join(sql.split())[:60]] += time.perf_counter() - start

        return timed


async def main(n: int) -> None:
    timings = Timings()
    timings.patch()
    config = StoreConfig(reuse=ReuseConfig(ttl_seconds=86400.0), fair=FairConfig(buffer=64))
    with tempfile.TemporaryDirectory(prefix="bench-push-unit-") as tmp:
        store = TaskStore(
            sqlite_backend.SqliteBackend(Path(tmp) / "tasks.db"), config, lambda envelopes: None
        )
        async with store:
            offers = store.push_dispatch()
            pushes: asyncio.Queue[Any] = asyncio.Queue()  # the offering stream's way out, unread
            outlet = Outlet(pushes, asyncio.get_running_loop())
            calls: list[float] = []
            result = task_pb2.TtsResult(audio_url="charai-media:x.wav", duration_seconds=1.0)
            run = time.time_ns()  # no two tasks alike (reuse would answer a claim with another's result)
            for i in range(WARMUP + n):
                offers.offer(
                    outlet,
                    spb.WorkerOffer(worker_id="inproc", types=[task_pb2.TASK_TYPE_TTS_GENERATION], slots=1),
                )
                if i == WARMUP:
                    timings.units.clear()
                    timings.statements.clear()
                    timings.keys.clear()
                timings.creating = True
                start = time.perf_counter()
                task, _ = await store.create("default", tts_request("push-unit", f"line {run} {i}"))
                calls.append(time.perf_counter() - start)
                timings.creating = False
                await store.complete(spb.CompleteTaskRequest(task_id=task.id, attempt=1, tts_result=result))
            assert offers.pushed == WARMUP + n, "a create was not pushed"
    units, calls = timings.units, calls[WARMUP:]
    print(
        f"{n} pushed creates, one at a time: unit on the database thread p50 {pct(units, 0.5) * 1e6:.0f} us,"
        f" p90 {pct(units, 0.9) * 1e6:.0f} us; the whole call p50 {pct(calls, 0.5) * 1e6:.0f} us"
    )
    for sql, seconds in sorted(timings.statements.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds / n * 1e6:6.1f} us per create  {sql}")
    first, second, third = (pct([k[j] for k in timings.keys], 0.5) * 1e6 for j in range(3))
    loops, start = 5000, time.perf_counter()
    for _ in range(loops):
        reuse.reuse_key("default", task, config.reuse)  # the last task created, as in its unit
    loop_us = (time.perf_counter() - start) / loops * 1e6
    print(
        f"reuse key in the unit, three calls in a row, p50: {first:.1f} / {second:.1f} / {third:.1f} us;"
        f" in a tight loop {loop_us:.1f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.push_unit", description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
