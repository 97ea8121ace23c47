"""E1: how close a queued task's ``estimated_start_time`` is to when it actually starts, for a
steady backlog.

One TTS lane with a fixed number of slots (worker concurrency) and provider calls of a known
latency range: ``n`` tasks are submitted at once; once the lane has been starting tasks for a
while (a tenth of them started), a sample of the tasks still queued is read with GetTask, each
read noting the wall time and the estimate. When all have run, each sample's estimated wait
(estimate minus read time) is compared with its actual wait (``start_time`` minus read time):
the relative error, its median and p90 in absolute value, its median with sign (bias), and the
share of samples within ±30 % (the issue's bar).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from charai.client import CharaiClient

from bench.common import log, pct
from bench.ours import E, collect, emulator_stats, stack, submit_all, us, wait_finished

SLOTS = 8
SAMPLES = 60


async def e1(runs: int, n: int, lo: float, hi: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    env = {"CHARAI_TTS_CONCURRENCY": str(SLOTS)}
    args = ["--latency", f"{lo}:{hi}", "--seed", "5"]
    async with stack(env=env, emulator_args=args) as s, CharaiClient(s.gateway_grpc) as client:
        for r in range(1, runs + 1):
            res = await _e1_once(s, client, f"e1-{r}-{uuid.uuid4().hex[:6]}", n)
            results.append(res)
            log(
                f"  charai E1 run {r}: |error| median {res['abs_error_pct_median']:.1f} %,"
                f" p90 {res['abs_error_pct_p90']:.1f} %, within 30 %: {res['within_30pct_share']:.0%}"
            )
    return results


async def _e1_once(s: Any, client: CharaiClient, character: str, n: int) -> dict[str, Any]:
    await emulator_stats(s, reset=True)
    _, _, ids = await submit_all(client, character, n, 50, "eta")
    warm = max(SLOTS * 4, n // 10)
    while True:  # the lane has a measured rate once a tenth of the backlog has started
        stats = await emulator_stats(s)
        if stats["calls"].get("audio.speech", 0) >= warm:
            break
        await asyncio.sleep(0.1)
    samples: list[tuple[str, float, float]] = []
    for task_id in ids[warm + SLOTS :: max(1, (n - warm - SLOTS) // SAMPLES)]:
        task = await client.get(task_id)
        if task.status == E.TASK_STATUS_QUEUED and task.HasField("estimated_start_time"):
            samples.append((task_id, time.time(), us(task.estimated_start_time)))
    await wait_finished(client, character, timeout=3600)
    started = {t.id: us(t.start_time) for t in await collect(client, character) if t.HasField("start_time")}
    errors = []
    for task_id, read_at, estimate in samples:
        actual = started.get(task_id, 0.0) - read_at
        if actual > 0.5:  # a task that started right after the read says nothing about rates
            errors.append(100.0 * ((estimate - read_at) - actual) / actual)
    magnitudes = [abs(e) for e in errors]
    return {
        "tasks": n,
        "samples": len(errors),
        "abs_error_pct_median": pct(magnitudes, 0.5),
        "abs_error_pct_p90": pct(magnitudes, 0.9),
        "bias_pct_median": pct(errors, 0.5),
        "within_30pct_share": sum(1 for m in magnitudes if m <= 30.0) / max(1, len(magnitudes)),
    }
