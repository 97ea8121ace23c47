"""Operating the gateway: ``/metrics`` on the HTTP port and the health watcher.

Kept out of the composition root so the root only wires them (one line each).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiohttp import web
from charai.core.metrics import CONTENT_TYPE_LATEST, Metrics
from grpc_health.v1 import health_pb2

log = structlog.get_logger("gateway")
#: How often the health watcher probes its dependencies.
HEALTH_INTERVAL_S = 1.0


def metrics_routes(metrics: Metrics) -> list[web.RouteDef]:
    """``GET /metrics``: the Prometheus text format of this gateway's registry. Not behind the
    API tokens (scrapers carry none) and it names no tenant, task or key."""

    async def scrape(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return [web.get("/metrics", scrape)]


class HealthWatcher:
    """Flips the gRPC health service to NOT_SERVING while ``probe`` says a dependency is away,
    and back to SERVING when it returns; a load balancer then routes around this replica."""

    def __init__(
        self, health: Any, service_names: Sequence[str], probe: Callable[[], Awaitable[bool]]
    ) -> None:
        self._health = health
        self._names = (*service_names, "")
        self._probe = probe
        self.serving = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                ok = await self._probe()
            except Exception:
                ok = False
            if ok == self.serving:
                continue
            self.serving = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._names:
                await self._health.set(name, status)
            log.warning("health_changed", serving=ok)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
