"""Weighted fair share and newcomers on the real stack: ``python -m bench.newcomers [--runs R]
[--trials T] [--backlog N]``.

The devstack with the provider emulator admitting 2 calls at once (0.1 to 0.2 s each) and
``CHARAI_DISPATCH_BUFFER=2``, as the README advises for such a provider. Tenant "a" (weight 1) and
"big" (weight 3, from a tenants file) each queue ``N`` TTS tasks; once the lane runs, a new tenant
queues 1 or 3 tasks about every second (``T`` such newcomers a run). Printed per run: each
newcomer's first start (seconds after its create, the other tenants' starts in between, their
provider calls before its first call), the medians and maxima, and big's and a's starts while
both held work (3:1 is the weights' share).

Why: BENCHMARKS.md, thirty-fourth pass. With 2 slots the weights were ignored (1:1), and a job
put back by a first turn's hand-over could stop the whole lane for 4 to 5 s (a newcomer's first start
over 1 s in 6 of 14 trials); F1 has one tenant of each and equal weights, so it showed neither.
Tenants talk to task_store directly (the tenant field), as a gateway does for API keys.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from charai.core.storeclient import StoreClient

from bench.common import log
from bench.fairness import _events, _of, speech
from bench.ours import E, emulator_stats, stack, us, worker_store

SLOTS = 2
WEIGHTS = "[defaults]\nweight = 1\n\n[tenants.big]\nweight = 3\n"
#: A newcomer's first start later than this counts as a stall (a call takes 0.1–0.2 s).
STALL_S = 1.0


async def _starts(store: StoreClient, tenants: list[str]) -> list[tuple[float, int, str]]:
    """(time, sequence, tenant) of every STARTED event of ``tenants``, in sequence order."""
    out = []
    for tenant in tenants:
        for event in _of(await _events(store, tenant), E.TASK_EVENT_TYPE_STARTED):
            out.append((us(event.time), event.sequence, tenant))
    return sorted(out, key=lambda s: s[1])


async def _run(store: StoreClient, s: Any, trials: int, backlog: int) -> dict[str, Any]:
    run, began = f"n{time.monotonic_ns()}", time.time()
    a, big = f"{run}-a", "big"  # "big" as the tenants file names it
    for start in range(0, backlog, 50):
        count = min(50, backlog - start)
        await store.batch_create_tasks(a, [speech(f"{a} {i}") for i in range(start, start + count)])
        await store.batch_create_tasks(big, [speech(f"{big}-{run} {i}") for i in range(start, start + count)])
    while len(await _starts(store, [a, big])) < 12:
        await asyncio.sleep(0.05)
    waits: list[float] = []
    between: list[int] = []
    calls: list[int] = []
    newcomers = []
    for trial in range(trials):
        name = f"{run}-c{trial}"
        newcomers.append(name)
        count = 3 if trial % 3 == 0 else 1
        seen = len((await emulator_stats(s))["log"])
        at = time.time()
        await store.batch_create_tasks(name, [speech(f"{name} {i}") for i in range(count)])
        while not (mine := _of(await _events(store, name), E.TASK_EVENT_TYPE_STARTED)):
            await asyncio.sleep(0.01)
        first = min(us(e.time) for e in mine)
        await asyncio.sleep(0.8)  # its call reaches the emulator's log; the lane runs on meanwhile
        texts = [c["text"] for c in (await emulator_stats(s))["log"][seen:]]
        waits.append(first - at)
        between.append(sum(1 for t, _, _ in await _starts(store, [a, big]) if at < t < first))
        calls.append(next((i for i, text in enumerate(texts) if text.startswith(name + " ")), len(texts)))
        log(
            f"  newcomer {trial} ({count} tasks): first start {first - at:.3f} s,"
            f" {between[-1]} starts of a and big between, {calls[-1]} of their calls before its first"
        )
    starts = [x for x in await _starts(store, [a, big]) if x[0] >= began]  # big lives on across runs
    for tenant in [a, big, *newcomers]:  # out of the next run's way
        for task in await _queued(store, tenant):
            await store.cancel_task(tenant, task)
    return {
        "first_start_median_s": statistics.median(waits),
        "first_start_max_s": max(waits),
        "stalls": sum(1 for w in waits if w > STALL_S),
        "starts_between_max": max(between),
        "calls_before_median": statistics.median(calls),
        "big_starts": sum(1 for _, _, t in starts if t == big),
        "a_starts": sum(1 for _, _, t in starts if t == a),
    }


async def _queued(store: StoreClient, tenant: str) -> list[str]:
    ids = []
    for event in _of(await _events(store, tenant), E.TASK_EVENT_TYPE_QUEUED):
        task = await store.get_task(tenant, event.task.id)
        if task.status == E.TASK_STATUS_QUEUED:
            ids.append(task.id)
    return ids


async def main(runs: int, trials: int, backlog: int) -> None:
    args = ["--latency", "0.1:0.2", "--max-concurrency", str(SLOTS), "--seed", "9"]
    with tempfile.TemporaryDirectory() as tmp:
        tenants = Path(tmp) / "tenants.toml"
        tenants.write_text(WEIGHTS)
        env = {"CHARAI_DISPATCH_BUFFER": str(SLOTS), "CHARAI_TENANTS_FILE": str(tenants)}
        async with stack(env=env, emulator_args=args) as s, worker_store(s) as store:
            for r in range(1, runs + 1):
                res = await _run(store, s, trials, backlog)
                log(
                    f"run {r}: first start median {res['first_start_median_s']:.3f} s, max"
                    f" {res['first_start_max_s']:.3f} s, {res['stalls']} of {trials} over {STALL_S:.0f} s;"
                    f" at most {res['starts_between_max']} starts between; starts big {res['big_starts']}"
                    f" : a {res['a_starts']}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=14, help="newcomers per run")
    parser.add_argument("--backlog", type=int, default=150, help="tasks a and big each queue")
    ns = parser.parse_args()
    asyncio.run(main(ns.runs, ns.trials, ns.backlog))
