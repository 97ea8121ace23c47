"""``/metrics`` on ``CHARAI_METRICS_ADDR`` for the processes without an HTTP server of their own
(task_store, the workers), and the gauges shown there. The gateway serves ``/metrics`` on its HTTP
port instead (``charai.gateway.ops``).

Two kinds of gauges: *live* ones read a number of the process at each scrape (jobs in flight),
and *refreshed* ones are set by a coroutine every few seconds while metrics are served (queue
depths read from the database; nobody pays for those queries when metrics are off).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import structlog
from charai.core.clock import SYSTEM, Clock
from charai.core.metrics import Metrics, MetricsServer
from prometheus_client import Gauge

log = structlog.get_logger("metrics")
#: How often refreshed gauges are updated, by default.
REFRESH_S = 5.0


class MetricsEndpoint:
    """Wires a process's :class:`Metrics`: live gauges always, and with ``addr`` set the
    ``/metrics`` server and the refresher. ``async with`` starts it; ``close()`` is idempotent.

    Args:
        metrics: the process's registry.
        addr: ``HOST:PORT`` to serve on (``CHARAI_METRICS_ADDR``); empty: not served.
        live: ``(gauge, read)`` pairs; each gauge shows ``read()`` at each scrape.
        refresh: sets the refreshed gauges; called at once and then every ``refresh_every``
            seconds on ``clock`` while served. A failure is logged and tried again next time.
    """

    def __init__(
        self,
        metrics: Metrics,
        addr: str,
        *,
        live: Iterable[tuple[Gauge, Callable[[], float]]] = (),
        refresh: Callable[[], Awaitable[None]] | None = None,
        refresh_every: float = REFRESH_S,
        clock: Clock = SYSTEM,
    ) -> None:
        self._metrics = metrics
        self._addr = addr
        self._live = list(live)
        self._refresh = refresh
        self._every = refresh_every
        self._clock = clock
        self._server: MetricsServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound ``/metrics`` port (0: metrics not served)."""
        return 0 if self._server is None else self._server.port

    def start(self) -> None:
        for gauge, read in self._live:
            gauge.set_function(read)
        if not self._addr or self._server is not None:
            return
        try:
            self._server = MetricsServer(self._metrics, self._addr)
        except OSError as exc:
            raise SystemExit(
                f"cannot serve metrics on {self._addr} (CHARAI_METRICS_ADDR): {exc.strerror}"
            ) from None
        if self._refresh is not None:
            self._task = asyncio.create_task(self._refresher(self._refresh), name="metrics-refresh")
        log.info("metrics_listening", port=self._server.port)

    async def _refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await refresh()
            except Exception as exc:  # e.g. the database is away: keep the last values
                log.warning("metrics_refresh_failed", error=str(exc))
            await self._clock.sleep(self._every)

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._server is not None:
            server, self._server = self._server, None
            # Its shutdown waits for the serving thread's next poll: not on the event loop.
            await asyncio.to_thread(server.close)

    async def __aenter__(self) -> MetricsEndpoint:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
