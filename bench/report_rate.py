"""What a progress report costs task_store at a given rate: ``python -m bench.report_rate
[--tasks 10,30,100] [--rounds R] [--seconds S]``.

A real task_store (and gateway, for the creates) from the devstack. Per round and per count of
tasks T (alternated), T running tasks report progress at 20 Hz each (20 T reports a second,
spread evenly, as B5's simulated workers send them) for S seconds from one coalescing
``StoreClient`` on ``ExchangeStream``, as a worker process sends them. Prints, per report:
task_store's CPU (its main thread, its database thread and the rest apart), its threads' context
switches (voluntary and involuntary), and how long its threads waited for a core; and the
report's round trip. At low rates each report travels alone (its own message, unit of work,
commit and bus message), so what it costs is mostly the wake-ups it takes, not its work.
"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: the services' gRPC transport, as in bench

# isort: split
import argparse
import asyncio
import dataclasses
import os
import time

from charai.client import CharaiClient
from charai.core.storeclient import StoreClient

from bench import ours
from bench.common import CLK_TCK, pct, runqueue_wait_seconds

HZ = 20.0


@dataclasses.dataclass
class Threads:
    """Per-thread counters of one process, from /proc/<pid>/task/*."""

    cpu: dict[int, float]  # tid -> user + system seconds
    switches: dict[int, tuple[int, int]]  # tid -> (voluntary, involuntary)
    waited: float  # seconds runnable but not running, all threads

    @classmethod
    def read(cls, pid: int) -> Threads:
        cpu: dict[int, float] = {}
        switches: dict[int, tuple[int, int]] = {}
        for entry in os.listdir(f"/proc/{pid}/task"):
            tid = int(entry)
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
            cpu[tid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
            switches[tid] = (
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            )
        return cls(cpu, switches, runqueue_wait_seconds(pid))


def _busiest(before: Threads, after: Threads, main: int) -> tuple[float, float, float]:
    """CPU seconds of the main thread, of the busiest other thread (the database thread) and
    of all the rest."""
    used = {tid: after.cpu[tid] - before.cpu.get(tid, 0.0) for tid in after.cpu}
    others = sorted((v for tid, v in used.items() if tid != main), reverse=True)
    return used.get(main, 0.0), (others[0] if others else 0.0), sum(others[1:])


async def _paced(store: StoreClient, ids: list[str], seconds: float, trips: list[float]) -> int:
    """Every task reports at HZ for ``seconds``, the tasks' reports spread evenly; how many."""
    sent = 0

    async def reporter(task_id: str, offset: float) -> None:
        nonlocal sent
        await asyncio.sleep(offset)
        start = time.perf_counter()
        for i in range(int(seconds * HZ)):
            delay = start + i / HZ - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            await store.report_progress(task_id, 1, 11 + i % 78, "generating")
            trips.append((time.perf_counter() - t0) * 1000)
            sent += 1

    await asyncio.gather(*(reporter(t, k / HZ / len(ids)) for k, t in enumerate(ids)))
    return sent


async def main(counts: list[int], rounds: int, seconds: float) -> None:
    async with (
        ours.stack(env=ours.B5_ENV, services=("task_store", "gateway")) as s,
        CharaiClient(s.gateway_grpc) as client,
        ours.worker_store(s) as store,
    ):
        lines = [ours.tts_request(f"rate-{k}", f"rate line {k}") for k in range(max(counts))]
        ids = [(await client.create(line)).id for line in lines]
        await asyncio.gather(*(store.claim_task(t, 1, "bench") for t in ids))
        pid = ours.pid(s, "task_store")
        for r in range(rounds):
            for count in counts:
                trips: list[float] = []
                before, c0 = Threads.read(pid), time.perf_counter()
                n = await _paced(store, ids[:count], seconds, trips)
                after, wall = Threads.read(pid), time.perf_counter() - c0
                main_s, db_s, rest_s = _busiest(before, after, pid)
                voluntary = sum(v - before.switches.get(t, (0, 0))[0] for t, (v, _) in after.switches.items())
                forced = sum(i - before.switches.get(t, (0, 0))[1] for t, (_, i) in after.switches.items())
                us = 1e6 / n
                print(
                    f"round {r + 1}, {count} tasks ({n / wall:.0f} reports/s): task_store"
                    f" {(main_s + db_s + rest_s) * us:.0f} CPU-us per report (main thread"
                    f" {main_s * us:.0f}, database thread {db_s * us:.0f}, rest {rest_s * us:.0f}),"
                    f" {voluntary / n:.1f} + {forced / n:.1f} context switches (voluntary +"
                    f" involuntary), {(after.waited - before.waited) * us:.0f} us waiting for a core;"
                    f" round trip p50 {pct(trips, 0.5):.2f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.report_rate", description=__doc__)
    parser.add_argument("--tasks", default="10,30,100", help="comma-separated counts of reporting tasks")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    asyncio.run(main([int(x) for x in args.tasks.split(",")], args.rounds, args.seconds))
