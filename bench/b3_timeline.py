"""Where B3's makespan goes at many jobs in flight: ``python -m bench.b3_timeline [--n 1000]
[--concurrency 1000] [--runs 2] [--latency 1:2] [--buffer B]``.

B3's load (``bench.ours``: n TTS tasks, 100 CreateTask calls in flight, one worker of the given
concurrency, the emulator answering after a seeded 1 to 2 s), after one warm-up of 200 tasks. Per
run it prints how many tasks were created, their jobs published to JetStream (a core NATS
subscription on the jobs subjects, as they are published) and the tasks started (claimed), every
50 ms from the first create; create → start quantiles; the jobs task_store pushed to the worker
(``charai_jobs_pushed_total``); the run's efficiency (ideal / makespan); the last tasks to start
and to end; and the CPU each process (the load generator as ``load``) used from the first create
to the last start, sampled from /proc every 10 ms. ``--buffer``:
``CHARAI_DISPATCH_BUFFER`` (default 4: released jobs not claimed per task type, at least).
"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: the services' gRPC transport, as in bench

# isort: split
import argparse
import asyncio
import contextlib
import os
import threading
import time
import uuid

import aiohttp
import nats
from charai.client import CharaiClient
from charai.core.topology import Topology
from charai.devstack.stack import free_port
from charai.store.v1 import store_service_pb2 as spb
from google.protobuf.message import DecodeError

from bench.common import cpu_seconds, pct
from bench.ours import Draws, collect, emulator_stats, pids, stack, submit_all, us, wait_finished

STEP_MS = 50


class CpuSampler:
    """Every 10 ms, the CPU seconds each process has used so far (a thread: the event loop is busy)."""

    def __init__(self, procs: dict[str, int]) -> None:
        self._procs = procs
        self._samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.time(), {k: cpu_seconds(p) for k, p in self._procs.items()}))
            self._stop.wait(0.01)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process from the last sample before ``start`` to the first after ``end``."""
        before = max(
            (s for s in self._samples if s[0] <= start), default=self._samples[0], key=lambda s: s[0]
        )
        after = min((s for s in self._samples if s[0] >= end), default=self._samples[-1], key=lambda s: s[0])
        return {k: after[1][k] - before[1][k] for k in self._procs}


PUSHED = "charai_jobs_pushed_total"


async def pushed(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(PUSHED + " "):
                return float(line.split()[1])
    return 0.0


async def main(n: int, concurrency: int, runs: int, lo: float, hi: float, buffer: int) -> None:
    metrics = free_port()
    env = {"CHARAI_TTS_CONCURRENCY": str(concurrency), "CHARAI_DISPATCH_BUFFER": str(buffer)}
    draws = Draws(7, lo, hi)
    async with (
        stack(
            env,
            emulator_args=["--latency", f"{lo}:{hi}", "--seed", "7"],
            service_env={"task_store": {"CHARAI_METRICS_ADDR": f"127.0.0.1:{metrics}"}},
        ) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        nc = await nats.connect(s.nats_url)
        published: dict[str, float] = {}

        async def on_job(msg: object) -> None:
            with contextlib.suppress(DecodeError):  # a webhook delivery's job, not a task's
                published[spb.Job.FromString(msg.data).task_id] = time.time()  # type: ignore[attr-defined]

        await nc.subscribe(Topology().jobs_subjects, cb=on_job)
        await nc.flush()
        try:
            for r in range(runs + 1):
                count = n if r else min(n, 200)
                stats = await emulator_stats(s, reset=True)
                draws.consumed += stats["calls"]["audio.speech"]
                ideal = max(draws.window(count))
                character = f"b3t-{r}-{uuid.uuid4().hex[:6]}"
                await asyncio.sleep(0.5)
                published.clear()
                pushed0 = await pushed(metrics)
                with CpuSampler({**pids(s), "load": os.getpid()}) as cpu:
                    first, last, _ = await submit_all(client, character, count, min(concurrency, 100), "io")
                    await wait_finished(client, character, timeout=600)
                tasks = await collect(client, character)
                if r:
                    report(r, tasks, published, first, last, ideal, await pushed(metrics) - pushed0)
                    upto = max(us(t.start_time) for t in tasks)
                    used = cpu.between(first, upto)
                    print(
                        f"  CPU-ms from the first create to the last start ({(upto - first) * 1e3:.0f} ms): "
                        + ", ".join(
                            f"{k} {v * 1e3:.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1])
                        )
                        + f"; total {sum(used.values()) * 1e3:.0f}"
                    )
        finally:
            await nc.close()


def report(
    run: int, tasks: list, published: dict[str, float], first: float, last: float, ideal: float, pushes: float
) -> None:
    created = sorted(us(t.create_time) - first for t in tasks)
    started = sorted(us(t.start_time) - first for t in tasks)
    sent = sorted(published[t.id] - first for t in tasks if t.id in published)
    waits = [us(t.start_time) - us(t.create_time) for t in tasks]
    makespan = max(us(t.end_time) for t in tasks) - first
    print(
        f"run {run}: efficiency {ideal / makespan:.3f} (makespan {makespan:.3f} s, ideal {ideal:.3f}),"
        f" submit {last - first:.3f} s, {len(tasks)} tasks, {pushes:.0f} pushed"
    )
    print(
        f"  create -> start: p50 {pct(waits, 0.5) * 1e3:.0f}, p90 {pct(waits, 0.9) * 1e3:.0f},"
        f" max {max(waits) * 1e3:.0f} ms; last start {max(started) * 1e3:.0f} ms"
    )
    for what, key in (("starts", "start_time"), ("ends", "end_time")):
        print(f"  the last 5 {what} (ms from the first create: created, published, started, ended):")
        for t in sorted(tasks, key=lambda t: us(getattr(t, key)))[-5:]:
            pub = published.get(t.id)
            stamps = [us(t.create_time), pub, us(t.start_time), us(t.end_time)]
            print(
                f"    {t.id[-12:]}"
                + "".join(f" {(x - first) * 1e3 if x else float('nan'):6.0f}" for x in stamps)
            )
    print("     ms  created  published  started")
    end = int(max(started) * 1e3) + STEP_MS
    for ms in range(STEP_MS, end + 1, STEP_MS):
        at = ms / 1e3
        counts = [sum(1 for x in xs if x <= at) for xs in (created, sent, started)]
        print(f"  {ms:5d}  {counts[0]:7d}  {counts[1]:9d}  {counts[2]:7d}")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.b3_timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="tasks per run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=1000, help="the worker's (default 1000)")
    parser.add_argument("--runs", type=int, default=2, help="measured runs (default 2)")
    parser.add_argument("--latency", default="1:2", help="provider latency MIN:MAX seconds (default 1:2)")
    parser.add_argument("--buffer", type=int, default=4, help="CHARAI_DISPATCH_BUFFER (default 4)")
    a = parser.parse_args()
    lo, hi = (float(x) for x in a.latency.split(":"))
    asyncio.run(main(a.n, a.concurrency, a.runs, lo, hi, a.buffer))


if __name__ == "__main__":
    cli()
