"""W1: webhook deliveries to a local receiver, against a bare aiohttp client posting the same
bodies (the floor).

charai, two figures per run:

* **drain**: ``n`` completed tasks whose deliveries wait while the sender is stopped; the sender
  starts and the receiver counts until every one arrived: deliveries/s.
* **latency**: tasks submitted at a steady rate with the sender running; for each delivery,
  its arrival at the receiver minus the event's time (the payload's ``timestamp``): p50/p99.

The floor posts ``n`` bodies of the same size with one keep-alive aiohttp session and the same
number in flight as the sender (``CHARAI_WEBHOOK_CONCURRENCY``, 64): deliveries/s and the
request latency p50/p99.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from charai.client import CharaiClient

from bench.common import log, pct
from bench.ours import stack, tts_request, wait_finished

CONCURRENCY = 64
ENV = {
    "CHARAI_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
    "CHARAI_WEBHOOK_CONCURRENCY": str(CONCURRENCY),
    "CHARAI_TTS_CONCURRENCY": "256",
}
SERVICES = ("task_store", "gateway", "tts_worker", "webhook_sender")


class Receiver:
    """Answers 204 at once and notes when each webhook-id first arrived, and its event time."""

    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, float]] = {}
        self.body_bytes: list[int] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        delivery_id = request.headers.get("webhook-id", "")
        if delivery_id and delivery_id not in self.arrivals:
            stamp = json.loads(body).get("timestamp", "")
            event = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else now
            self.arrivals[delivery_id] = (now, event)
            self.body_bytes.append(len(body))
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the deliveries did not all arrive")
        await asyncio.sleep(0.01)


async def _submit(client: CharaiClient, character: str, n: int, url: str, rate: float | None) -> None:
    request = tts_request(character, "")
    request.webhook.url = url
    counter = iter(range(n))
    started = time.monotonic()

    async def lane() -> None:
        for i in counter:
            if rate:
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            one = type(request)()
            one.CopyFrom(request)
            one.tts.text = f"w1 {character} {i}"
            await client.create(one)

    await asyncio.gather(*(lane() for _ in range(min(64, n))))


async def w1(runs: int, n: int, paced: int, rate: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    async with (
        Receiver() as receiver,
        stack(env=ENV, services=SERVICES) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        for r in range(runs + 1):
            res = await _w1_once(s, client, receiver, n if r else min(n, 200), paced, rate)
            if r:
                results.append(res)
                log(
                    f"  charai W1 run {r}: {res['deliveries_per_s']:.0f} deliveries/s,"
                    f" event->delivery p99 {res['latency_ms_p99']:.0f} ms"
                )
    return results


async def _w1_once(
    s: Any, client: CharaiClient, receiver: Receiver, n: int, paced: int, rate: float
) -> dict[str, Any]:
    receiver.arrivals.clear()
    await s.stop_service("webhook_sender")
    character = f"w1-{uuid.uuid4().hex[:8]}"
    await _submit(client, character, n, receiver.url, None)
    await wait_finished(client, character, timeout=600)
    await s.start_service("webhook_sender")
    await s.wait_ready("webhook_sender")
    started = time.time()
    await _until(lambda: len(receiver.arrivals) >= n, timeout=900)
    drain_s = max(arrival for arrival, _ in receiver.arrivals.values()) - started

    receiver.arrivals.clear()
    character = f"w1p-{uuid.uuid4().hex[:8]}"
    await _submit(client, character, paced, receiver.url, rate)
    await _until(lambda: len(receiver.arrivals) >= paced, timeout=600)
    lags = [(arrival - event) * 1000 for arrival, event in receiver.arrivals.values()]
    return {
        "deliveries": n,
        "deliveries_per_s": n / drain_s,
        "latency_ms_p50": pct(lags, 0.5),
        "latency_ms_p99": pct(lags, 0.99),
        "body_bytes_median": pct(receiver.body_bytes, 0.5),
    }


async def w1_floor(runs: int, n: int, body_bytes: int) -> list[dict[str, Any]]:
    """A bare keep-alive aiohttp client posting ``n`` bodies of ``body_bytes``, 64 in flight."""
    results: list[dict[str, Any]] = []
    body = json.dumps({"type": "task.completed", "data": {"pad": "x" * max(0, body_bytes - 60)}}).encode()
    async with Receiver() as receiver:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as http:
            for r in range(runs + 1):
                run = await _floor_once(http, receiver.url, body, n if r else min(n, 200))
                if r:
                    results.append(run)
                    log(f"  floor W1 run {r}: {run['deliveries_per_s']:.0f} posts/s")
    return results


async def _floor_once(http: aiohttp.ClientSession, url: str, body: bytes, n: int) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def lane() -> None:
        for _ in counter:
            headers = {"webhook-id": f"msg_{uuid.uuid4().hex}", "content-type": "application/json"}
            t0 = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - t0
    return {
        "deliveries": len(latencies),
        "deliveries_per_s": len(latencies) / elapsed,
        "latency_ms_p50": pct(latencies, 0.5),
        "latency_ms_p99": pct(latencies, 0.99),
    }
