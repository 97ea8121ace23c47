"""Floors: what the building blocks do with nothing of charai on top, measured in the same run.

- B1/B2: raw JetStream (nats-py against the same nats-server binary): publish → pull receipt,
  ``publish_async`` rate, ``fetch(100)`` + ``ack`` rate.
- B3: a bare asyncio loop with aiohttp against the same emulator (own process, RSS sampled).
- B4: raw ``grpc.aio`` no-op unary server (own process) driven by the B4 load generator.
- B5: a minimal ``grpc.aio`` fan-out server (own process): key -> open streams, nothing else.

``python -m bench.floors grpc-server|aio-io ...`` are the child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.common import child, free_port, log, pct

RESPONSE = b"\x0a" + bytes([200]) + b"\x01" + b"x" * 200  # ~ the size of a CreateTaskResponse


# -- child processes ----------------------------------------------------------------------------
async def _grpc_server() -> None:
    subscribers: dict[bytes, set[asyncio.Queue[bytes]]] = {}

    async def unary(request: bytes, context: Any) -> bytes:
        return RESPONSE

    async def emit(request: bytes, context: Any) -> bytes:
        key, _, _ = request.partition(b"|")
        for q in subscribers.get(key, ()):
            q.put_nowait(request)
        return b""

    async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers.setdefault(request, set()).add(q)
        try:
            yield b"ready"
            while True:
                yield await q.get()
        finally:
            subscribers[request].discard(q)

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Emit": grpc.unary_unary_rpc_method_handler(emit),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening {port}", flush=True)
    await server.wait_for_termination()


def _rss_self() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 1024


async def _aio_io(url: str, n: int, c: int, warmup: int) -> None:
    import aiohttp

    body = {"model": "glm-tts", "voice": "tongtong", "response_format": "wav"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sem = asyncio.Semaphore(c)
        ends: list[float] = []

        async def one(i: int) -> None:
            async with sem, http.post(url, json={**body, "input": f"floor {i}"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
            ends.append(time.time())

        await asyncio.gather(*(one(i) for i in range(warmup)))
        ends.clear()
        base = _rss_self()
        peak = base

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_self())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        start = time.time()
        await asyncio.gather(*(one(i) for i in range(n)))
        sampler.cancel()
        peak = max(peak, _rss_self())
    print(
        json.dumps({"start": start, "end": max(ends), "rss_base_kb": base, "rss_peak_kb": peak}), flush=True
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("grpc-server")
    io = sub.add_parser("aio-io")
    io.add_argument("--url", required=True)
    io.add_argument("--n", type=int, required=True)
    io.add_argument("--c", type=int, required=True)
    io.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "grpc-server":
        asyncio.run(_grpc_server())
    else:
        asyncio.run(_aio_io(args.url, args.n, args.c, args.warmup))


# -- drivers ------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def grpc_floor_server() -> AsyncIterator[str]:
    async with child(
        [sys.executable, "-m", "bench.floors", "grpc-server"], name="grpc-raw", ready="listening"
    ) as (
        _,
        lines,
    ):
        port = next(line.split()[1] for line in lines if line.startswith("listening"))
        yield f"127.0.0.1:{port}"


async def b4_floor(runs: int, seconds: float, request: bytes, concurrency: int = 100) -> list[dict[str, Any]]:
    from bench.load import unary_load

    results = []
    async with grpc_floor_server() as target:
        for r in range(runs + 1):
            res = await unary_load(
                target, "/bench.Raw/Unary", request, concurrency, seconds if r else min(seconds, 3.0)
            )
            if r:
                results.append(res)
                log(f"  raw grpc.aio B4 run {r}: {res['rps']:.0f} RPS")
    return results


async def b5_floor(runs: int, streams: int, keys: int, events: int, hz: float) -> list[dict[str, Any]]:
    """The same pattern as B5 against a fan-out server that does nothing else."""
    results = []
    async with grpc_floor_server() as target:
        channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, streams // 100))]
        emitter = grpc.aio.insecure_channel(target)
        emit = emitter.unary_unary("/bench.Raw/Emit")
        try:
            for r in range(runs + 1):
                received: list[dict[bytes, float]] = [{} for _ in range(streams)]
                ready = [asyncio.Event() for _ in range(streams)]
                run_id = f"{r}-{time.time_ns()}".encode()

                async def watch(
                    j: int,
                    received: list[dict[bytes, float]] = received,
                    ready: list[asyncio.Event] = ready,
                    run_id: bytes = run_id,
                ) -> None:
                    call = channels[j % len(channels)].unary_stream("/bench.Raw/Watch")(
                        run_id + b"-" + str(j % keys).encode()
                    )
                    mine = received[j]
                    async for msg in call:
                        if msg == b"ready":
                            ready[j].set()
                        else:
                            mine[msg] = time.time()

                watchers = [asyncio.create_task(watch(j)) for j in range(streams)]
                for ev in ready:
                    await ev.wait()
                emitted: dict[bytes, float] = {}

                async def reporter(
                    k: int, offset: float, emitted: dict[bytes, float] = emitted, run_id: bytes = run_id
                ) -> None:
                    await asyncio.sleep(offset)
                    start = time.perf_counter()
                    for i in range(events):
                        delay = start + i / hz - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        msg = run_id + b"-" + str(k).encode() + b"|" + str(i).encode() + b"|" + b"p" * 400
                        emitted[msg] = time.time()
                        await emit(msg)

                t0 = time.perf_counter()
                await asyncio.gather(*(reporter(k, k / hz / keys) for k in range(keys)))
                expected = streams * events
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and sum(len(m) for m in received) < expected:
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - t0
                for w in watchers:
                    w.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
                lags = [(at - emitted[m]) * 1000 for mine in received for m, at in mine.items()]
                got = sum(len(m) for m in received)
                if r:
                    res = {
                        "deliveries": got,
                        "lost": expected - got,
                        "lag_ms_p50": pct(lags, 0.5),
                        "lag_ms_p99": pct(lags, 0.99),
                        "deliveries_per_s": got / elapsed,
                    }
                    results.append(res)
                    log(f"  raw grpc.aio fan-out B5 run {r}: lag p99 {res['lag_ms_p99']:.1f} ms")
        finally:
            for ch in [*channels, emitter]:
                await ch.close()
    return results


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[str]:
    from charai.devstack.stack import nats_server_binary

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        args = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(Path(tmp))]
        async with child(args, name="nats", ready="Server is ready"):
            yield f"nats://127.0.0.1:{port}"


async def nats_pickup(runs: int, n: int, interval: float) -> list[dict[str, Any]]:
    """JetStream publish (awaited PubAck, file storage) -> a waiting pull consumer receives it."""
    import nats

    results = []
    async with nats_server() as url:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="PICKUP", subjects=["pickup.>"])
        sub = await js.pull_subscribe("pickup.job", durable="pickup")
        try:
            for r in range(runs + 1):
                sent: dict[bytes, float] = {}
                lat: list[float] = []
                count = n if r else min(n, 30)

                async def consume(
                    sent: dict[bytes, float] = sent, lat: list[float] = lat, count: int = count
                ) -> None:
                    while len(lat) < count:
                        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                            for m in await sub.fetch(1, timeout=1):
                                lat.append((time.perf_counter() - sent[m.data]) * 1000)
                                await m.ack()

                consumer = asyncio.create_task(consume())
                await asyncio.sleep(0.2)
                start = time.perf_counter()
                for i in range(count):
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    key = f"{r}-{i}".encode()
                    sent[key] = time.perf_counter()
                    await js.publish("pickup.job", key)
                await asyncio.wait_for(consumer, 30)
                if r:
                    results.append(
                        {"pub_to_receipt_ms_p50": pct(lat, 0.5), "pub_to_receipt_ms_p99": pct(lat, 0.99)}
                    )
                    log(f"  raw JetStream B1 run {r}: p50 {pct(lat, 0.5):.2f} ms")
        finally:
            await nc.close()
    return results


async def nats_throughput(runs: int, n: int) -> list[dict[str, Any]]:
    """``publish_async`` of n jobs, then ``fetch(100)`` + ``ack`` of all of them."""
    import nats

    results = []
    async with nats_server() as url:
        nc = await nats.connect(url)
        js = nc.jetstream(publish_async_max_pending=4000)
        await js.add_stream(name="THRU", subjects=["thru.>"])
        payload = b"j" * 128
        try:
            for r in range(runs + 1):
                count = n if r else min(n, 1000)
                sub = await js.pull_subscribe(f"thru.{r}", durable=f"thru{r}")
                t0 = time.perf_counter()
                for _ in range(count):
                    await js.publish_async(f"thru.{r}", payload)
                await js.publish_async_completed()
                t1 = time.perf_counter()
                got = 0
                while got < count:
                    msgs = await sub.fetch(100, timeout=5)
                    for m in msgs:
                        await m.ack()
                    got += len(msgs)
                await nc.flush()
                t2 = time.perf_counter()
                await sub.unsubscribe()
                if r:
                    res = {"publish_async_per_s": count / (t1 - t0), "fetch_ack_per_s": count / (t2 - t1)}
                    results.append(res)
                    log(
                        f"  raw JetStream B2 run {r}: {res['publish_async_per_s']:.0f} pub/s,"
                        f" {res['fetch_ack_per_s']:.0f} fetch+ack/s"
                    )
        finally:
            await nc.close()
    return results


async def aio_io_floor(
    runs: int, n: int, c: int, emulator_url: str, draws: Any, warmup: int = 100
) -> list[dict[str, Any]]:
    """Bare asyncio + aiohttp, semaphore of c, against the emulator; own process per run."""
    from bench.ours import ideal_makespan

    results = []
    url = emulator_url + "/api/paas/v4/audio/speech"
    for r in range(runs):
        draws.consumed += warmup
        ideal = ideal_makespan(draws.window(n), c)
        draws.consumed += n
        args = [sys.executable, "-m", "bench.floors", "aio-io", "--url", url, "--n", str(n), "--c", str(c)]
        args += ["--warmup", str(warmup)]
        async with child(args, name="aio-floor", ready='"end"', timeout=600) as (_, lines):
            out = json.loads(next(line for line in lines if line.startswith("{")))
        makespan = out["end"] - out["start"]
        res = {
            "concurrency": c,
            "makespan_s": makespan,
            "ideal_s": ideal,
            "efficiency": ideal / makespan,
            "rss_base_mb": out["rss_base_kb"] / 1024,
            "rss_peak_mb": out["rss_peak_kb"] / 1024,
            "kb_per_in_flight": (out["rss_peak_kb"] - out["rss_base_kb"]) / min(n, c),
        }
        results.append(res)
        log(f"  asyncio floor B3 C={c} run {r + 1}: efficiency {res['efficiency']:.3f}")
    return results


if __name__ == "__main__":
    main()
