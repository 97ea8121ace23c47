"""A pass-through HTTP proxy that counts the calls in flight through it: how many calls the
workers had at the provider at once, all workers together, measured outside them (the shared
provider limit's tests and ``make bench`` B8)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web


class InFlightProxy:
    """Forwards every request to ``upstream`` (same path and body, answer relayed unchanged) and
    keeps ``current`` / ``peak`` calls in flight, ``calls`` in all, and when each arrived
    (``arrivals``: wall-clock time, path and the calls in flight with it, in order)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.current = 0
        self.peak = 0
        self.calls = 0
        self.arrivals: list[tuple[float, str, int]] = []
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    def reset_peak(self) -> None:
        self.peak = self.current

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.current += 1
        self.calls += 1
        self.peak = max(self.peak, self.current)
        self.arrivals.append((time.time(), request.path, self.current))
        try:
            body = await request.read()
            headers = {
                k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
            }
            async with self._session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as answer:
                data = await answer.read()
                keep = {
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower()
                    not in ("content-length", "transfer-encoding", "content-encoding", "connection")
                }
                return web.Response(status=answer.status, body=data, headers=keep)
        finally:
            self.current -= 1


@contextlib.asynccontextmanager
async def inflight_proxy(upstream: str) -> AsyncIterator[InFlightProxy]:
    proxy = InFlightProxy(upstream)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy._forward)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        proxy._session = session
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            proxy.url = f"http://127.0.0.1:{port}"
            yield proxy
        finally:
            await runner.cleanup()
