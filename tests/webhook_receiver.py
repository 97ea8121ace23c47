"""A real HTTP receiver of webhooks for the tests: records every request, answers by path.

``/flaky`` answers each webhook-id 500, then resets the connection, then 200; ``/throttled``
answers 429 with ``Retry-After: 2`` once per id; ``/gone`` 410; ``/moved`` a 302 to ``/ok``;
``/down`` 503; ``/ok`` 200. While ``gate`` is cleared, requests wait before being answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from aiohttp import web


@dataclasses.dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    time: float
    answered: int  # 0: the connection was reset

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Receiver:
    """A real HTTP server on a free loopback port that records every request."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        #: Requests received (answered or not), in arrival order: (path, webhook-id).
        self.arrived: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    def seen(self, path: str, delivery_id: str) -> int:
        return sum(1 for h in self.hits if h.path == path and h.id == delivery_id)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await request.read()
        self.arrived.append((path, headers.get("webhook-id", "")))
        await self.gate.wait()
        earlier = self.seen(path, headers.get("webhook-id", ""))
        status = {"/ok": 200, "/gone": 410, "/moved": 302, "/down": 503}.get(path, 200)
        if path == "/flaky":
            status = (500, 0, 200)[min(earlier, 2)]
        elif path == "/throttled":
            status = 429 if earlier == 0 else 200
        self.hits.append(Hit(path, headers, body, time.monotonic(), status))
        if status == 0:
            assert request.transport is not None
            request.transport.abort()  # a connection reset, no answer
            raise asyncio.CancelledError
        if status == 302:
            raise web.HTTPFound(f"{self.url}/ok")
        response = web.Response(status=status)
        if status == 429:
            response.headers["Retry-After"] = "2"
        return response

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
