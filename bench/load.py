"""The unary load generator of B4, shared by charai's gateway and the raw grpc.aio floor so both
are driven by exactly the same client code: raw bytes in and out (no client-side protobuf)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from bench.common import pct


async def unary_load(
    target: str, method: str, request: bytes, concurrency: int, seconds: float, channels: int = 1
) -> dict[str, Any]:
    # A local subchannel pool: channels to one target would share one connection otherwise, and
    # a multi-process gateway is spread over connections, not calls.
    options = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    calls = [ch.unary_unary(method) for ch in chans]  # no serializers: bytes pass through
    latencies: list[float] = []
    errors = 0
    for ch in chans:
        await asyncio.wait_for(ch.channel_ready(), 10)
    stop_at = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        call = calls[k % len(calls)]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await call(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    t_start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    for ch in chans:
        await ch.close()
    return {
        "calls": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "concurrency": concurrency,
    }
