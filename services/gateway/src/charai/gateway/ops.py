"""Operating the gateway: ``/metrics`` on its HTTP port.

(Its health watcher is :class:`charai.core.health.HealthWatcher`, shared with task_store.)
"""

from __future__ import annotations

from aiohttp import web
from charai.core.metrics import CONTENT_TYPE_LATEST, Metrics


def metrics_routes(metrics: Metrics) -> list[web.RouteDef]:
    """``GET /metrics``: the Prometheus text format of this gateway's registry. Not behind the
    API tokens (scrapers carry none) and it names no tenant, task or key."""

    async def scrape(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return [web.get("/metrics", scrape)]
