"""B8: two image worker processes share one provider credential's limit (issue 13).

The stack as real processes (devstack): nats-server, the emulator admitting ``limit`` (50)
concurrent calls and answering 429 beyond, task_store, the gateway, and two ``image_worker``
processes (64 jobs each at once, the default), both calling the provider through a pass-through
proxy in this process that counts the calls they have at the provider at once, together.

Per run: a burst of ``n`` image tasks; the figures are the most calls the two workers had in
flight at once (the proxy's count) against the limit they learned (read from GetQueueStats
while the run goes), the share of provider calls refused with 429, and the makespan against
the ideal one (the emulator's seeded latency draws on ``limit`` slots). The first run is a
warm-up: on a new credential the workers learn the limit with one burst of refusals (128 calls
against 50), which is what the measured runs must not repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from charai.client import CharaiClient
from charai.devstack.inflight import InFlightProxy, inflight_proxy
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_service_pb2

from bench.common import log, pct
from bench.ours import QUIET, Draws, E, collect, emulator_stats, ideal_makespan, us, wait_finished

WORKERS = ("image_worker", "image_worker_2")
#: CogView at 512x512: the emulator's PNGs stay cheap (a 1024x1024 one costs ~28 ms of CPU), so
#: the emulator's own CPU does not pace a 2-core machine instead of the provider's limit.
MODEL, RESOLUTION = "cogview-4", "512x512"


class LimitSampler:
    """Reads the learned limit (GetQueueStats ``providers``) every ``interval`` seconds."""

    def __init__(self, client: CharaiClient, interval: float = 0.1) -> None:
        self.client = client
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def read(self) -> int:
        stats = await self.client.operations_stats()
        return max((p.limit for p in stats.providers if p.type == E.TASK_TYPE_IMAGE_GENERATION), default=0)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), await self.read()))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> LimitSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def at(self, when: float) -> int:
        """The limit read last before ``when`` (the first one if none was)."""
        before = [limit for t, limit in self.samples if t <= when]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)


async def b8(
    runs: int, n: int, lo: float, hi: float, limit: int = 50, seed: int = 13, warmup: int = 200
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    draws = Draws(seed, lo, hi)
    args = ["--latency", f"{lo}:{hi}", "--seed", str(seed), "--max-concurrency", str(limit)]
    env = {
        **QUIET,
        "CHARAI_IMAGE_MODEL": MODEL,
        "CHARAI_IMAGE_ASYNC_MODE": "sync",
        "CHARAI_OPERATOR_TENANTS": "default",  # auth is off: the bench is tenant "default"
    }
    with tempfile.TemporaryDirectory(prefix="bench-b8-") as tmp:
        async with (
            Stack(Path(tmp), env, emulator_args=args, services=("task_store", "gateway")) as s,
            inflight_proxy(s.emulator_url) as proxy,
        ):
            for name in WORKERS:
                worker_env = {
                    "CHARAI_IMAGE_API_BASE_URL": proxy.url + "/api/paas/v4",
                    "CHARAI_WORKER_ID": name,
                }
                await s.start_service(name, worker_env, service="image_worker")
            for name in WORKERS:
                await s.wait_ready(name, 60)
            async with CharaiClient(s.gateway_grpc) as client:
                for r in range(runs + 1):
                    count = n if r else min(n, warmup)
                    res = await _b8_once(
                        s, client, proxy, draws, f"b8-{r}-{uuid.uuid4().hex[:6]}", count, limit
                    )
                    if r:
                        results.append(res)
                        log(
                            f"  charai B8 run {r}: max in flight {res['max_in_flight']} vs learned limit"
                            f" {res['learned_limit_max']}, 429s {res['pct_429']:.2f} %,"
                            f" makespan {res['makespan_vs_ideal']:.2f}x ideal"
                        )
    return results


async def _b8_once(
    s: Stack,
    client: CharaiClient,
    proxy: InFlightProxy,
    draws: Draws,
    character: str,
    n: int,
    limit: int,
) -> dict[str, Any]:
    stats = await emulator_stats(s, reset=True)
    calls_key = "images.generations"
    draws.consumed += stats["calls"][calls_key] - stats["concurrency"]["rejected"]
    ideal = ideal_makespan(draws.window(n), limit)
    proxy.reset_peak()
    proxy.arrivals.clear()
    with LimitSampler(client) as limits:
        await asyncio.sleep(0.3)
        first = time.time()
        await _submit(client, character, n)
        await wait_finished(client, character, timeout=3600)
    tasks = await collect(client, character)
    stats = await emulator_stats(s)
    calls, rejected = int(stats["calls"][calls_key]), int(stats["concurrency"]["rejected"])
    done = [t for t in tasks if t.status == E.TASK_STATUS_COMPLETED]
    makespan = max((us(t.end_time) for t in done), default=first) - first
    learned = [v for _, v in limits.samples if v]
    over = [in_flight - limits.at(t) for t, _, in_flight in proxy.arrivals if limits.at(t)]
    return {
        "tasks": n,
        "completed": len(done),
        "failed": sum(1 for t in tasks if t.status == E.TASK_STATUS_FAILED),
        "provider_calls": calls,
        "calls_429": rejected,
        "pct_429": 100 * rejected / max(1, calls),
        "max_in_flight": proxy.peak,
        "learned_limit_min": min(learned, default=0),
        "learned_limit_max": max(learned, default=0),
        "learned_limit_end": learned[-1] if learned else 0,
        "max_over_limit": max(over, default=0),
        "in_flight_p99": pct([float(x) for _, _, x in proxy.arrivals], 0.99),
        "makespan_s": makespan,
        "ideal_s": ideal,
        "makespan_vs_ideal": makespan / ideal,
    }


async def _submit(client: CharaiClient, character: str, n: int, concurrency: int = 100) -> None:
    counter = iter(range(n))

    async def lane() -> None:
        for i in counter:
            payload = E.ImagePayload(
                character_id=character, prompt=f"b8 {character} {i}", resolution=RESOLUTION
            )
            await client.create(
                task_service_pb2.CreateTaskRequest(type=E.TASK_TYPE_IMAGE_GENERATION, image=payload)
            )

    await asyncio.gather(*(lane() for _ in range(min(concurrency, n))))
