"""charai through the real stack (devstack: nats-server, emulator, task_store, gateway, workers as
real processes on loopback), one function per shape. Each returns the raw runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from charai.client import CharaiClient
from charai.core.storeclient import StoreClient
from charai.devstack.stack import Stack
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from bench.common import RssSampler, cpu_seconds, log, pct, rss_kb, runqueue_wait_seconds

# One tenant measures capacity here: the per-tenant submission rate limit (where the gateway has
# one) would measure the limiter instead.
QUIET = {"CHARAI_LOG_LEVEL": "warning", "CHARAI_SUBMIT_RATE_PER_TENANT": "0"}
E = task_pb2
STACK_PROCS = ("nats", "emulator", "task_store", "gateway", "image_worker", "tts_worker")


@contextlib.asynccontextmanager
async def stack(
    env: dict[str, str] | None = None,
    emulator_args: list[str] | None = None,
    services: tuple[str, ...] = ("task_store", "gateway", "tts_worker"),
    service_env: dict[str, dict[str, str]] | None = None,
) -> AsyncIterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        async with Stack(
            Path(tmp),
            {**QUIET, **(env or {})},
            emulator_args=emulator_args or ["--latency", "0"],
            services=services,
            service_env=service_env,
        ) as s:
            yield s


def pid(s: Stack, name: str) -> int:
    return s.procs[name].process.pid


def pids(s: Stack) -> dict[str, int]:
    return {n: pid(s, n) for n in STACK_PROCS if n in s.procs and s.procs[n].process.returncode is None}


def worker_store(s: Stack) -> StoreClient:
    """task_store as a worker process reaches it: progress and claims coalesced into Exchange,
    carried as messages of ExchangeStream calls unless the stack sets CHARAI_EXCHANGE_STREAM=false."""
    stream = s.env.get("CHARAI_EXCHANGE_STREAM", "true").lower() not in ("false", "0", "no", "off")
    token = s.env.get("CHARAI_INTERNAL_TOKEN", "")
    return StoreClient(s.task_store_addr, token, coalesce=True, stream=stream)


def internal(s: Stack) -> tuple[tuple[str, str], ...]:
    """Call metadata for task_store's internal API (the stack may set CHARAI_INTERNAL_TOKEN)."""
    token = s.env.get("CHARAI_INTERNAL_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def tts_request(character: str, text: str) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=E.TASK_TYPE_TTS_GENERATION,
        tts=E.TtsPayload(
            character_id=character,
            text=text,
            voice_style="tongtong",
            callback=E.Callback(type="character_voice", character_id=character),
        ),
    )


async def emulator_stats(s: Stack, reset: bool = False) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(s.emulator_url + "/_emulator/stats") as r:
            stats: dict[str, Any] = await r.json()
        if reset:
            async with http.post(s.emulator_url + "/_emulator/reset") as r:
                await r.read()
    return stats


class Draws:
    """The emulator's latency draws, replayed: it seeds ``random.Random(seed)`` and draws one
    ``uniform(lo, hi)`` per admitted call, so the ideal makespan of a run is known exactly."""

    def __init__(self, seed: int, lo: float, hi: float) -> None:
        self.seed, self.lo, self.hi = seed, lo, hi
        self.consumed = 0  # admitted calls so far

    def window(self, count: int) -> list[float]:
        """The latencies of the next ``count`` admitted calls."""
        rng = random.Random(self.seed)
        for _ in range(self.consumed):
            rng.uniform(self.lo, self.hi)
        return [rng.uniform(self.lo, self.hi) for _ in range(count)]


def ideal_makespan(latencies: list[float], slots: int) -> float:
    """Lower bound of any schedule of these calls on ``slots`` parallel slots."""
    return max(sum(latencies) / slots, *latencies)


async def submit_all(
    client: CharaiClient, character: str, n: int, concurrency: int, prefix: str = "bench"
) -> tuple[float, float, list[str]]:
    """Creates n TTS tasks with ``concurrency`` calls in flight; returns (first wall, last wall, ids)."""
    ids: list[str] = []
    counter = iter(range(n))
    first = time.time()

    async def lane() -> None:
        for i in counter:
            task = await client.create(tts_request(character, f"{prefix} {character} {i}"))
            ids.append(task.id)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, n))))
    return first, time.time(), ids


async def wait_finished(client: CharaiClient, character: str, timeout: float) -> None:
    """Polls ListTasks (cheap: one indexed query) until no task of ``character`` is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for status in (E.TASK_STATUS_QUEUED, E.TASK_STATUS_RUNNING):
            async for _ in client.list({"characterId": character}, status=status, page_size=1):
                busy = True
                break
            if busy:
                break
        if not busy:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"tasks of {character} still unfinished after {timeout:.0f} s")


async def collect(client: CharaiClient, character: str) -> list[task_pb2.Task]:
    return [t async for t in client.list({"characterId": character}, page_size=500)]


def us(ts: Any) -> float:
    return float(ts.ToMicroseconds()) / 1e6


# -- B1 -----------------------------------------------------------------------------------------
async def b1(runs: int, n: int, interval: float = 0.01, warmup: int = 30) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    async with stack() as s, CharaiClient(s.gateway_grpc) as client:
        for r in range(runs + 1):
            res = await _b1_once(
                client, f"b1-{r}-{uuid.uuid4().hex[:6]}", n if r else min(n, warmup), interval
            )
            if r:
                results.append(res)
                log(f"  charai B1 run {r}: started at client p50 {res['started_at_client_ms_p50']:.2f} ms")
            await asyncio.sleep(1.0)  # idle again
    return results


async def _b1_once(client: CharaiClient, character: str, n: int, interval: float) -> dict[str, Any]:
    receipts: dict[str, dict[int, float]] = {}
    store_started: dict[str, float] = {}
    started_wall: dict[str, float] = {}  # when the client got the started event (wall clock)
    everything = asyncio.Event()
    done: set[str] = set()

    async def listen() -> None:
        async for event in client.watch_tasks({"characterId": character}):
            at = time.perf_counter()
            mine = receipts.setdefault(event.task.id, {})
            mine.setdefault(event.type, at)
            if event.type == E.TASK_EVENT_TYPE_STARTED:
                store_started[event.task.id] = us(event.time)
                started_wall[event.task.id] = time.time()
            if event.type == E.TASK_EVENT_TYPE_COMPLETED:
                done.add(event.task.id)
                if len(done) >= n:
                    everything.set()

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.5)  # the stream is open and registered
    submitted: dict[str, tuple[float, float, float]] = {}  # id -> (perf t0, wall t0, rpc ms)
    created: dict[str, float] = {}  # id -> the task's create_time (stamped in task_store)

    async def one(i: int) -> None:
        wall, t0 = time.time(), time.perf_counter()
        task = await client.create(tts_request(character, f"pickup {character} {i}"))
        submitted[task.id] = (t0, wall, (time.perf_counter() - t0) * 1000)
        created[task.id] = us(task.create_time)

    start = time.perf_counter()
    pending = []
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(i)))
    await asyncio.gather(*pending)
    async with asyncio.timeout(60):
        await everything.wait()
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    started, progress, completed, in_store, rpc = [], [], [], [], []
    # Where the pickup's time goes (wall clocks of one machine): client -> the create's
    # transaction in task_store; that -> the claim's transaction (commit, relay, JetStream,
    # worker, claim); that -> the started event at the client (commit, bus, gateway, stream).
    to_create, create_to_start, start_to_client = [], [], []
    for task_id, (t0, wall, rpc_ms) in submitted.items():
        got = receipts[task_id]
        started.append((got[E.TASK_EVENT_TYPE_STARTED] - t0) * 1000)
        if E.TASK_EVENT_TYPE_PROGRESS in got:
            progress.append((got[E.TASK_EVENT_TYPE_PROGRESS] - t0) * 1000)
        completed.append((got[E.TASK_EVENT_TYPE_COMPLETED] - t0) * 1000)
        in_store.append((store_started[task_id] - wall) * 1000)
        rpc.append(rpc_ms)
        to_create.append((created[task_id] - wall) * 1000)
        create_to_start.append((store_started[task_id] - created[task_id]) * 1000)
        start_to_client.append((started_wall[task_id] - store_started[task_id]) * 1000)
    return {
        "tasks": n,
        "started_at_client_ms_p50": pct(started, 0.5),
        "started_at_client_ms_p99": pct(started, 0.99),
        "started_in_store_ms_p50": pct(in_store, 0.5),
        "started_in_store_ms_p99": pct(in_store, 0.99),
        "first_progress_at_client_ms_p50": pct(progress, 0.5),
        "first_progress_at_client_ms_p99": pct(progress, 0.99),
        "completed_at_client_ms_p50": pct(completed, 0.5),
        "create_rpc_ms_p50": pct(rpc, 0.5),
        "create_rpc_ms_p99": pct(rpc, 0.99),
        "client_to_create_tx_ms_p50": pct(to_create, 0.5),
        "create_tx_to_claim_tx_ms_p50": pct(create_to_start, 0.5),
        "claim_tx_to_client_ms_p50": pct(start_to_client, 0.5),
    }


# -- B2 -----------------------------------------------------------------------------------------
async def b2(
    runs: int, n: int, submit_concurrency: int = 64, drain: bool = True, warmup: int = 1000
) -> dict[str, list[dict[str, Any]]]:
    drained: list[dict[str, Any]] = []
    async with stack() as s, CharaiClient(s.gateway_grpc) as client:
        e2e = await _b2_runs(s, client, "b2", runs, n, submit_concurrency, warmup)
        if drain:
            for r in range(1, runs + 1):
                res = await _b2_drain(s, client, f"b2d-{r}-{uuid.uuid4().hex[:6]}", n, submit_concurrency)
                drained.append(res)
                log(f"  charai B2 drain run {r}: {res['tasks_per_s']:.0f} tasks/s")
    return {"e2e": e2e, "drain": drained}


async def b2_noop(
    runs: int, n: int, submit_concurrency: int = 64, warmup: int = 1000
) -> list[dict[str, Any]]:
    """B2's load with a worker whose handler does nothing (:mod:`charai.devstack.noop_worker`):
    the queue alone (creates, dispatch, claims, outcomes, acks, events), as the peers' empty job
    functions measure theirs. No provider call, no media; no emulator either."""
    async with noop_stack() as s, CharaiClient(s.gateway_grpc) as client:
        return await _b2_runs(s, client, "b2-noop", runs, n, submit_concurrency, warmup)


@contextlib.asynccontextmanager
async def noop_stack() -> AsyncIterator[Stack]:
    """The stack with a TTS worker whose handler does nothing (:mod:`charai.devstack.noop_worker`)."""
    async with stack(services=("task_store", "gateway")) as s:
        await s.start_service("tts_worker", service="devstack.noop_worker")
        await s.wait_for_line("tts_worker", "worker_started", 30)
        yield s


async def _b2_runs(
    s: Stack, client: CharaiClient, label: str, runs: int, n: int, conc: int, warmup: int
) -> list[dict[str, Any]]:
    """A warm-up run (``warmup`` tasks), then ``runs`` of ``n``, each on a character of its own."""
    out: list[dict[str, Any]] = []
    for r in range(runs + 1):
        res = await _b2_e2e(
            s, client, f"{label}-{r}-{uuid.uuid4().hex[:6]}", n if r else min(n, warmup), conc
        )
        if r:
            out.append(res)
            log(
                f"  charai {label} run {r}: {res['tasks_per_s']:.0f} tasks/s,"
                f" {res['cpu_ms_per_task']:.2f} CPU-ms"
            )
    return out


def _cpu(s: Stack) -> dict[str, float]:
    return {name: cpu_seconds(p) for name, p in pids(s).items()}


def _cpu_delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    out = {f"cpu_ms_per_task_{k}": (after.get(k, 0.0) - v) * 1000 / n for k, v in before.items()}
    out["cpu_ms_per_task"] = sum(out.values())
    return out


async def _b2_e2e(s: Stack, client: CharaiClient, character: str, n: int, conc: int) -> dict[str, Any]:
    cpu0 = _cpu(s)
    first, last_submit, _ = await submit_all(client, character, n, conc, "noop")
    await wait_finished(client, character, timeout=max(120.0, n / 20))
    cpu1 = _cpu(s)
    tasks = await collect(client, character)
    ends = [us(t.end_time) for t in tasks if t.status == E.TASK_STATUS_COMPLETED]
    makespan = max(ends) - first
    return {
        "tasks": n,
        "completed": len(ends),
        "makespan_s": makespan,
        "tasks_per_s": len(ends) / makespan,
        "submit_per_s": n / (last_submit - first),
        **_cpu_delta(cpu0, cpu1, n),
    }


async def _b2_drain(s: Stack, client: CharaiClient, character: str, n: int, conc: int) -> dict[str, Any]:
    await s.stop_service("tts_worker")
    await submit_all(client, character, n, conc, "noop")
    await asyncio.sleep(1.0)  # the outbox relay publishes everything
    cpu0 = _cpu(s)
    s.procs["tts_worker"].lines.clear()
    await s.start_service("tts_worker")
    await s.wait_for_line("tts_worker", "worker_started", 30)
    await wait_finished(client, character, timeout=max(120.0, n / 20))
    cpu1 = _cpu(s)
    tasks = await collect(client, character)
    starts = [us(t.start_time) for t in tasks]
    ends = [us(t.end_time) for t in tasks if t.status == E.TASK_STATUS_COMPLETED]
    span = max(ends) - min(starts)
    delta = _cpu_delta(cpu0, cpu1, n)
    return {
        "tasks": n,
        "completed": len(ends),
        "drain_s": span,
        "tasks_per_s": (len(ends) - 1) / span,
        **delta,
    }


# -- B3 -----------------------------------------------------------------------------------------
async def b3(
    runs: int, n: int, concurrencies: tuple[int, ...], lo: float, hi: float, seed: int = 7, warmup: int = 200
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    draws = Draws(seed, lo, hi)
    async with stack(emulator_args=["--latency", f"{lo}:{hi}", "--seed", str(seed)]) as s:  # noqa: SIM117
        async with CharaiClient(s.gateway_grpc) as client:
            for c in concurrencies:
                s.env["CHARAI_TTS_CONCURRENCY"] = str(c)
                await s.stop_service("tts_worker")
                s.procs["tts_worker"].lines.clear()
                await s.start_service("tts_worker")
                await s.wait_for_line("tts_worker", "worker_started", 30)
                out[str(c)] = []
                for r in range(runs + 1):
                    count = n if r else min(n, warmup)
                    res = await _b3_once(s, client, draws, f"b3-{c}-{r}-{uuid.uuid4().hex[:6]}", count, c)
                    if r:
                        out[str(c)].append(res)
                        log(
                            f"  charai B3 C={c} run {r}: efficiency {res['efficiency']:.3f},"
                            f" {res['kb_per_in_flight']:.0f} KB"
                        )
    return out


async def _b3_once(
    s: Stack, client: CharaiClient, draws: Draws, character: str, n: int, c: int
) -> dict[str, Any]:
    stats = await emulator_stats(s, reset=True)
    draws.consumed += stats["calls"]["audio.speech"]
    ideal = ideal_makespan(draws.window(n), c)
    worker = pid(s, "tts_worker")
    await asyncio.sleep(0.5)
    base = rss_kb(worker)
    with RssSampler({"worker": [worker]}) as rss:
        first, last_submit, _ = await submit_all(client, character, n, min(c, 100), "io")
        await wait_finished(client, character, timeout=600)
    tasks = await collect(client, character)
    ends = [us(t.end_time) for t in tasks if t.status == E.TASK_STATUS_COMPLETED]
    stats = await emulator_stats(s)
    if stats["calls"]["audio.speech"] != n:
        log(f"  warning: {stats['calls']['audio.speech']} provider calls for {n} tasks")
    makespan = max(ends) - first
    peak_in_flight = int(stats["concurrency"]["peak"])
    return {
        "tasks": n,
        "completed": len(ends),
        "concurrency": c,
        "makespan_s": makespan,
        "ideal_s": ideal,
        "efficiency": ideal / makespan,
        "submit_s": last_submit - first,
        "rss_base_mb": base / 1024,
        "rss_peak_mb": rss.peak("worker") / 1024,
        "peak_in_flight": peak_in_flight,
        "kb_per_in_flight": (rss.peak("worker") - base) / max(1, peak_in_flight),
    }


# -- B4 -----------------------------------------------------------------------------------------
async def b4(
    runs: int, seconds: float, concurrency: int = 100, *, gateway_processes: int = 1, channels: int = 1
) -> list[dict[str, Any]]:
    """CreateTask calls answered per second. ``gateway_processes``: CHARAI_GATEWAY_PROCESSES;
    ``channels``: client connections (each is served by one gateway process). Each run also
    records the CPU seconds the gateway (every process) and task_store spent, per call."""
    from bench.load import unary_load

    results: list[dict[str, Any]] = []
    env = {"CHARAI_GATEWAY_PROCESSES": str(gateway_processes)}
    async with stack(env=env, services=("task_store", "gateway")) as s:
        request = tts_request("b4-load", "submit capacity").SerializeToString()
        procs = {
            "gateway": [pid(s, "gateway"), *s.gateway_processes().values()],
            "task_store": [pid(s, "task_store")],
        }

        def cpu() -> dict[str, float]:
            return {name: sum(map(cpu_seconds, pids)) for name, pids in procs.items()}

        for r in range(runs + 1):
            cpu0 = cpu()
            res = await unary_load(
                s.gateway_grpc,
                "/charai.tasks.v1.TaskService/CreateTask",
                request,
                concurrency,
                seconds if r else min(seconds, 3.0),
                channels,
            )
            for name, spent in cpu().items():
                res[f"{name}_cpu_ms_per_call"] = 1000 * (spent - cpu0[name]) / max(1, res["calls"])
            res["gateway_processes"] = len(procs["gateway"]) - 1 or 1
            if r:
                results.append(res)
                log(
                    f"  charai B4 run {r}: {res['rps']:.0f} RPS, p99 {res['p99_ms']:.1f} ms, CPU/call "
                    f"gateway {res['gateway_cpu_ms_per_call']:.2f} ms, "
                    f"task_store {res['task_store_cpu_ms_per_call']:.2f} ms"
                )
    return results


# -- B5 -----------------------------------------------------------------------------------------
# The bench claims its tasks by id as a worker claims delivered jobs, so every job is released at
# create (a held task's claim is answered DONE: its job is not out yet).
B5_ENV = {"CHARAI_WATCH_HEARTBEAT_SECONDS": "1", "CHARAI_DISPATCH_BUFFER": "10000"}


async def b5(
    runs: int,
    streams: int = 1000,
    tasks: int = 100,
    events: int = 50,
    hz: float = 20.0,
    per_message: int = 0,
) -> list[dict[str, Any]]:
    """``per_message``: the streams' ``max_events_per_message`` (0: one event per message)."""
    results: list[dict[str, Any]] = []
    async with (
        stack(env=B5_ENV, services=("task_store", "gateway")) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        channels = [grpc.aio.insecure_channel(s.gateway_grpc) for _ in range(max(1, streams // 100))]
        store = worker_store(s)
        try:
            for r in range(runs + 1):
                res = await _b5_once(
                    s,
                    client,
                    channels,
                    store,
                    f"b5-{r}-{uuid.uuid4().hex[:6]}",
                    streams if r else min(streams, 100),
                    tasks if r else min(tasks, 10),
                    events,
                    hz,
                    per_message,
                )
                if r:
                    results.append(res)
                    log(
                        f"  charai B5 (per message {per_message or 1}) run {r}: lost {res['lost']},"
                        f" lag p99 {res['lag_ms_p99']:.1f} ms"
                    )
        finally:
            for ch in channels:
                await ch.close()
            await store.close()
    return results


def _core_wait_s(s: Stack, gateway: int) -> float:
    """Seconds the threads of the gateway, task_store and this process (B5's load generator)
    have waited for a core (:func:`bench.common.runqueue_wait_seconds`)."""
    return sum(runqueue_wait_seconds(p) for p in (gateway, pid(s, "task_store"), os.getpid()))


async def _b5_once(
    s: Stack,
    client: CharaiClient,
    channels: list[grpc.aio.Channel],
    store: StoreClient,
    prefix: str,
    streams: int,
    tasks: int,
    events: int,
    hz: float,
    per_message: int = 0,
) -> dict[str, Any]:
    ids: list[str] = []
    for k in range(tasks):
        # A line of its own each, in every run: identical lines would be reused (one claim runs,
        # the rest wait for it).
        ids.append((await client.create(tts_request(f"{prefix}-{k}", f"streams {prefix} {k}"))).id)
    gateway = pid(s, "gateway")
    rss0 = rss_kb(gateway)
    received: list[dict[str, float]] = [{} for _ in range(streams)]  # per stream: "task:progress" -> wall
    registered = [asyncio.Event() for _ in range(streams)]
    emitted: dict[str, float] = {}

    async def watch(j: int) -> None:
        stub = task_service_pb2_grpc.TaskServiceStub(channels[j % len(channels)])
        call = stub.WatchTasks(
            task_service_pb2.WatchTasksRequest(
                metadata={"characterId": f"{prefix}-{j % tasks}"}, max_events_per_message=per_message
            )
        )
        mine = received[j]
        async for response in call:
            at = time.time()
            for event in response.events or [response.event]:
                if event.type == E.TASK_EVENT_TYPE_PROGRESS:
                    mine[f"{event.task.id}:{event.task.progress}"] = at
                elif event.type == E.TASK_EVENT_TYPE_HEARTBEAT:
                    registered[j].set()

    watchers = [asyncio.create_task(watch(j)) for j in range(streams)]
    async with asyncio.timeout(60):
        for ev in registered:
            await ev.wait()
    rss1 = rss_kb(gateway)
    claims = await asyncio.gather(*(store.claim_task(task_id, 1, "bench") for task_id in ids))
    assert all(c.outcome == spb.CLAIM_OUTCOME_RUN for c in claims), claims
    report_ms: list[float] = []

    async def reporter(task_id: str, offset: float) -> None:
        await asyncio.sleep(offset)
        start = time.perf_counter()
        for i in range(events):
            delay = start + i / hz - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            progress = 11 + i
            emitted[f"{task_id}:{progress}"] = time.time()
            t0 = time.perf_counter()
            await store.report_progress(task_id, 1, progress, "generating")
            report_ms.append((time.perf_counter() - t0) * 1000)

    cpu0 = {**_cpu(s), "bench": time.process_time()}
    wait0 = _core_wait_s(s, gateway)
    t_start = time.perf_counter()
    await asyncio.gather(*(reporter(t, k / hz / tasks) for k, t in enumerate(ids)))
    emit_s = time.perf_counter() - t_start
    expected = events * streams
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sum(len(m) for m in received) < expected:
        await asyncio.sleep(0.1)
    deliver_s = time.perf_counter() - t_start
    cpu = {k: v - cpu0[k] for k, v in {**_cpu(s), "bench": time.process_time()}.items()}
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    lags = [(at - emitted[key]) * 1000 for mine in received for key, at in mine.items() if key in emitted]
    got = sum(len(m) for m in received)
    return {
        "streams": streams,
        "tasks": tasks,
        "events_per_task": events,
        "events_emitted": len(emitted),
        "deliveries_expected": expected,
        "deliveries": got,
        "lost": expected - got,
        "lag_ms_p50": pct(lags, 0.5),
        "lag_ms_p99": pct(lags, 0.99),
        "lag_ms_max": max(lags, default=float("nan")),
        "deliveries_per_s": got / deliver_s,
        "emit_s": emit_s,
        "report_rpc_ms_p50": pct(report_ms, 0.5),
        "report_rpc_ms_p99": pct(report_ms, 0.99),
        "gateway_rss_kb_per_stream": (rss1 - rss0) / streams,
        "gateway_cpu_s": cpu["gateway"],
        "task_store_cpu_s": cpu["task_store"],
        # The load generator: its watchers and reporters share this process and the cores.
        "bench_cpu_s": cpu["bench"],
        # How long their threads waited for a core, per second of the run (1,000: on average
        # one thread of the three processes was ready to run and found both cores taken).
        "runqueue_wait_ms_per_s": (_core_wait_s(s, gateway) - wait0) * 1000 / deliver_s,
        "deliver_s": deliver_s,
    }


# -- B6 -----------------------------------------------------------------------------------------
async def b6(
    runs: int, n: int, lo: float, hi: float, limit: int = 50, seed: int = 11, warmup: int = 200
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    draws = Draws(seed, lo, hi)
    args = ["--latency", f"{lo}:{hi}", "--seed", str(seed), "--max-concurrency", str(limit)]
    async with stack(emulator_args=args) as s, CharaiClient(s.gateway_grpc) as client:
        for r in range(runs + 1):
            res = await _b6_once(
                s, client, draws, f"b6-{r}-{uuid.uuid4().hex[:6]}", n if r else min(n, warmup), limit
            )
            if r:
                results.append(res)
                log(
                    f"  charai B6 run {r}: {res['makespan_s']:.1f} s vs ideal {res['ideal_s']:.1f} s,"
                    f" 429s {res['pct_429']:.1f}%"
                )
    return results


async def _b6_once(
    s: Stack, client: CharaiClient, draws: Draws, character: str, n: int, limit: int
) -> dict[str, Any]:
    stats = await emulator_stats(s, reset=True)
    draws.consumed += stats["calls"]["audio.speech"] - stats["concurrency"]["rejected"]
    ideal = ideal_makespan(draws.window(n), limit)
    procs = {k: [v] for k, v in pids(s).items() if k in ("task_store", "gateway", "tts_worker", "nats")}
    await asyncio.sleep(0.3)
    with RssSampler(procs, interval=0.5) as rss:
        first, last_submit, _ = await submit_all(client, character, n, 100, "burst")
        await wait_finished(client, character, timeout=3600)
    tasks = await collect(client, character)
    stats = await emulator_stats(s)
    calls = int(stats["calls"]["audio.speech"])
    rejected = int(stats["concurrency"]["rejected"])
    if calls - rejected != n:
        log(f"  note: {calls - rejected} admitted calls for {n} tasks")
    done = [t for t in tasks if t.status == E.TASK_STATUS_COMPLETED]
    ends = [us(t.end_time) for t in done]
    waits = [us(t.start_time) - us(t.create_time) for t in tasks if t.HasField("start_time")]
    makespan = max(ends) - first
    worker = rss.series("tts_worker")
    tenth = max(1, len(worker) // 10)
    return {
        "tasks": n,
        "completed": len(done),
        "failed": sum(1 for t in tasks if t.status == E.TASK_STATUS_FAILED),
        "makespan_s": makespan,
        "ideal_s": ideal,
        "makespan_vs_ideal": makespan / ideal,
        "efficiency": ideal / makespan,
        "submit_s": last_submit - first,
        "provider_calls": calls,
        "calls_429": rejected,
        "pct_429": 100 * rejected / max(1, calls),
        "per_1k_jobs_429": 1000 * rejected / n,
        "queue_wait_s_p50": pct(waits, 0.5),
        "queue_wait_s_p99": pct(waits, 0.99),
        "retries": sum(max(0, t.attempt - 1) for t in tasks),
        "worker_rss_mb_first10pct_peak": max(worker[:tenth]) / 1024,
        "worker_rss_mb_peak": max(worker) / 1024,
        "worker_rss_mb_last10pct_peak": max(worker[-tenth:]) / 1024,
        "task_store_rss_mb_peak": rss.peak("task_store") / 1024,
        "gateway_rss_mb_peak": rss.peak("gateway") / 1024,
    }


# -- B7 -----------------------------------------------------------------------------------------
async def b7(
    runs: int, n: int = 200, ack_wait: float = 5.0, lo: float = 4.0, hi: float = 5.0
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    env = {
        "CHARAI_TTS_CONCURRENCY": str(max(256, n)),
        "CHARAI_ACK_WAIT_SECONDS": str(ack_wait),
        "CHARAI_LEASE_SECONDS": str(ack_wait),
        "CHARAI_SHUTDOWN_GRACE_SECONDS": "1",
    }
    async with stack(env=env, emulator_args=["--latency", f"{lo}:{hi}"]) as s:  # noqa: SIM117
        async with CharaiClient(s.gateway_grpc) as client:
            for r in range(runs + 1):
                res = await _b7_once(
                    s, client, f"b7-{r}-{uuid.uuid4().hex[:6]}", n if r else min(n, 20), ack_wait
                )
                if r:
                    results.append(res)
                    log(
                        f"  charai B7 run {r}: lost {res['lost']},"
                        f" redelivery max {res['redelivery_s_max']:.2f} s,"
                        f" duplicates {res['duplicate_provider_calls']}"
                    )
    return results


async def _b7_once(s: Stack, client: CharaiClient, character: str, n: int, ack_wait: float) -> dict[str, Any]:
    await emulator_stats(s, reset=True)
    completed_seen: set[str] = set()
    starts: dict[str, list[float]] = {}

    async def listen() -> None:
        async for event in client.watch_tasks({"characterId": character}):
            if event.type == E.TASK_EVENT_TYPE_STARTED:
                starts.setdefault(event.task.id, []).append(us(event.time))
            elif event.type == E.TASK_EVENT_TYPE_COMPLETED:
                completed_seen.add(event.task.id)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    await submit_all(client, character, n, 100, "crash")
    async with asyncio.timeout(30):
        while (await emulator_stats(s))["concurrency"]["current"] < n:
            await asyncio.sleep(0.05)
    in_flight = int((await emulator_stats(s))["concurrency"]["current"])
    killed_at = time.time()
    await s.kill_service("tts_worker")
    s.procs["tts_worker"].lines.clear()
    await s.start_service("tts_worker")
    await s.wait_for_line("tts_worker", "worker_started", 30)
    restarted_in = time.time() - killed_at
    await wait_finished(client, character, timeout=120)
    await asyncio.sleep(0.5)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    tasks = await collect(client, character)
    stats = await emulator_stats(s)
    calls = int(stats["calls"]["audio.speech"])
    redelivery = [v[1] - killed_at for v in starts.values() if len(v) > 1]
    completed = sum(1 for t in tasks if t.status == E.TASK_STATUS_COMPLETED)
    return {
        "tasks": n,
        "in_flight_at_kill": in_flight,
        "completed": completed,
        "lost": n - completed,
        "worker_restart_s": restarted_in,
        "redelivered": len(redelivery),
        "redelivery_s_p50": pct(redelivery, 0.5),
        "redelivery_s_max": max(redelivery, default=float("nan")),
        "redelivery_vs_ack_wait": max(redelivery, default=float("nan")) / ack_wait,
        "ack_wait_s": ack_wait,
        "provider_calls": calls,
        "duplicate_provider_calls": calls - n,
        "watch_saw_completed": len(completed_seen),
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)
