"""F1: fair share between tenants (task_store's backlog, released in fair order).

Two measurements:

* **A then B, through the real stack** (devstack processes, the emulator admitting 2 calls at
  once, slow calls): tenant A queues ``n`` tasks; once the lane runs steadily, tenant B queues 5.
  How long B's first task waits (in seconds, and in provider calls: the mean call latency, the
  time a slot takes to come free), how many of A's tasks start in between (a FIFO lane would
  start A's whole remaining backlog first), how many of A's provider calls reach the emulator
  between B's create and B's first call (its call log, in arrival order), and whether everything
  still finishes in the makespan the provider allows (ideal: every call's latency over 2 slots).
  The buffer is set to the provider's slots (``CHARAI_DISPATCH_BUFFER=2``), as the README advises
  for such providers.
  Tenants talk to task_store directly (the tenant field), as a gateway does for two API keys.
* **Release rate with 10,000 tenants each holding work**, in-process on SQLite (as
  ``make run``): 10,000 tenants x 5 held tasks, then the releaser releases as much as a
  10,000-job buffer allows, one transaction per 256 tasks (each a turn of another tenant); beside
  the same with a tenth of the tenants. Also how fast such tasks are created (each held, its place computed)
  and the cost of reading a held task's ``queue_position`` at the back of the order.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backlog import FairConfig
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2

from bench.common import log, pct
from bench.ours import E, emulator_stats, stack, us, worker_store

SLOTS = 2
#: CHARAI_DISPATCH_BUFFER as the README advises for a provider admitting few calls: its slots.
BUFFER = SLOTS
B_TASKS = 5
#: A's tasks started before B queues (the lane is running steadily by then).
STEADY = 20


def speech(text: str) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=E.TASK_TYPE_TTS_GENERATION,
        tts=E.TtsPayload(character_id="fair", text=text, voice_style="tongtong"),
    )


async def f1(runs: int, n: int, lo: float, hi: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    args = ["--latency", f"{lo}:{hi}", "--max-concurrency", str(SLOTS), "--seed", "9"]
    env = {"CHARAI_DISPATCH_BUFFER": str(BUFFER)}
    async with stack(env=env, emulator_args=args) as s, worker_store(s) as store:
        for r in range(1, runs + 1):
            res = await _f1_once(s, store, f"f1-{r}-{time.monotonic_ns()}", n, (lo + hi) / 2)
            results.append(res)
            log(
                f"  charai F1 run {r}: B's first start after {res['b_first_wait_s']:.2f} s"
                f" ({res['b_first_wait_calls']:.1f} calls), {res['a_started_between']} of A's tasks"
                f" in between, {res['a_calls_before_b_call']} of A's calls before B's first;"
                f" makespan / ideal {res['makespan_vs_ideal']:.2f}"
            )
    return results


async def _events(store: StoreClient, tenant: str) -> list[task_pb2.TaskEvent]:
    events: list[task_pb2.TaskEvent] = []
    after = 0
    while True:
        page = await store.list_events(spb.ListEventsRequest(tenant=tenant, after_sequence=after, limit=5000))
        if not page.events:
            return events
        events += page.events
        after = page.events[-1].sequence


def _of(events: list[task_pb2.TaskEvent], kind: int) -> list[task_pb2.TaskEvent]:
    return [e for e in events if e.type == kind]


async def _f1_once(s: Any, store: StoreClient, run: str, n: int, latency: float) -> dict[str, Any]:
    await emulator_stats(s, reset=True)
    a, b = f"{run}-a", f"{run}-b"
    started = time.time()
    for first in range(0, n, 50):
        await store.batch_create_tasks(a, [speech(f"{a} {i}") for i in range(first, min(n, first + 50))])
    while len(_of(await _events(store, a), E.TASK_EVENT_TYPE_STARTED)) < STEADY:
        await asyncio.sleep(0.05)
    calls_before_b = len((await emulator_stats(s))["log"])
    b_at = time.time()
    b_tasks = [await store.create_task(b, speech(f"{b} {i}")) for i in range(B_TASKS)]
    deadline = time.monotonic() + 3600
    while True:
        a_events, b_events = await _events(store, a), await _events(store, b)
        ended = _of(a_events, E.TASK_EVENT_TYPE_COMPLETED) + _of(b_events, E.TASK_EVENT_TYPE_COMPLETED)
        if len(ended) >= n + B_TASKS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    texts = [call["text"] for call in (await emulator_stats(s))["log"][calls_before_b:]]
    b_created = min(e.sequence for e in _of(b_events, E.TASK_EVENT_TYPE_QUEUED))
    b_starts = sorted(_of(b_events, E.TASK_EVENT_TYPE_STARTED), key=lambda e: e.sequence)
    a_starts = [e.sequence for e in _of(a_events, E.TASK_EVENT_TYPE_STARTED)]
    first_wait = us(b_starts[0].time) - b_at
    last_wait = us(b_starts[-1].time) - b_at
    last_end = max(us(e.time) for e in ended)
    ideal = (n + B_TASKS) * latency / SLOTS
    return {
        "a_tasks": n,
        "b_tasks": len(b_tasks),
        "a_started_before_b": sum(1 for q in a_starts if q < b_created),
        "a_started_between": sum(1 for q in a_starts if b_created < q < b_starts[0].sequence),
        "a_started_before_last_b": sum(1 for q in a_starts if b_created < q < b_starts[-1].sequence),
        "a_calls_before_b_call": next((i for i, t in enumerate(texts) if t.startswith(b)), len(texts)),
        "b_first_wait_s": first_wait,
        "b_first_wait_calls": first_wait / latency,
        "b_all_started_s": last_wait,
        "completed": len(ended),
        "makespan_s": last_end - started,
        "makespan_vs_ideal": (last_end - started) / ideal,
    }


# -- release rate with many tenants -------------------------------------------------------------
async def _hold(store: TaskStore, tenants: int, per_tenant: int) -> float:
    """Creates ``tenants`` x ``per_tenant`` tasks (one transaction per tenant); returns seconds."""
    request = task_service_pb2.CreateTaskRequest(
        type=E.TASK_TYPE_IMAGE_GENERATION,
        image=E.ImagePayload(character_id="fair", prompt="a knight", resolution="1024x1024"),
    )
    t0 = time.perf_counter()
    for t in range(tenants):
        await store.create_many(f"tenant-{t:05d}", [request] * per_tenant)
    return time.perf_counter() - t0


async def _release_all(store: TaskStore) -> tuple[int, float]:
    t0 = time.perf_counter()
    total = 0
    while True:
        count, _ = await store.release_held(E.TASK_TYPE_IMAGE_GENERATION)
        if not count:
            return total, time.perf_counter() - t0
        total += count


async def release_rate(tenants: int, per_tenant: int) -> dict[str, Any]:
    """Holds ``tenants`` x ``per_tenant`` tasks, then times their release (buffer 10,000)."""
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'tasks.db'}"
        async with open_store(url, StoreConfig(fair=FairConfig(buffer=1))) as store:
            create_s = await _hold(store, tenants, per_tenant)
            last = await store.list_tasks(f"tenant-{tenants - 1:05d}", task_service_pb2.ListTasksRequest())
            back = last[0][0]  # the newest task of the last tenant: the back of the order
            reads = []
            for _ in range(20):
                t0 = time.perf_counter()
                got = await store.get(f"tenant-{tenants - 1:05d}", back.id)
                reads.append((time.perf_counter() - t0) * 1000)
            position = got.queue_position
        async with open_store(url, StoreConfig(fair=FairConfig(buffer=10_000))) as store:
            released, seconds = await _release_all(store)
    return {
        "tenants": tenants,
        "held": tenants * per_tenant,
        "holding_creates_per_s": tenants * per_tenant / create_s,
        "released": released,
        "releases_per_s": released / seconds,
        "back_position": position,
        "get_back_task_ms_p50": pct(reads, 0.5),
    }


#: The comparison run has this fraction of the tenants, as many held tasks each.
FEW_TENANTS = 0.1


async def release_rates(runs: int, tenants: int, per_tenant: int) -> list[dict[str, Any]]:
    """Per run: the figures with ``tenants`` tenants, and the release rate with a tenth of them
    holding as many tasks each. A release finds the next tenant with one index probe, so ten
    times the tenants costs a deeper index and colder pages, not ten times the work (a scan of
    the tenants per release would make the rate fall tenfold)."""
    few_tenants = max(1, int(tenants * FEW_TENANTS))
    results = []
    for r in range(1, runs + 1):
        many = await release_rate(tenants, per_tenant)
        few = await release_rate(few_tenants, per_tenant)
        res = {**many, "few_tenants_releases_per_s": few["releases_per_s"]}
        res["rate_vs_few_tenants"] = res["releases_per_s"] / few["releases_per_s"]
        results.append(res)
        log(
            f"  charai F1 release run {r}: {res['releases_per_s']:.0f} releases/s with {tenants} tenants,"
            f" {few['releases_per_s']:.0f}/s with {few_tenants}; {res['holding_creates_per_s']:.0f}"
            f" holding creates/s; GetTask at the back {res['get_back_task_ms_p50']:.1f} ms"
            f" (position {res['back_position']})"
        )
    return results


def median_of(results: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))
