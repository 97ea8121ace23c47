"""gRPC health that follows a process's dependencies.

A service answers ``grpc.health.v1.Health`` with SERVING only while what it needs is in reach
(task_store: NATS and its database; the gateway: NATS and a SERVING task_store), so a load
balancer or an orchestrator probe routes around a replica that cannot do its work. One watcher
does that for every service with a gRPC port; each passes its own probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from charai.core.clock import SYSTEM, Clock
from grpc_health.v1 import health_pb2

log = structlog.get_logger("health")
#: How often a watcher probes its dependencies, by default.
HEALTH_INTERVAL_S = 1.0


class HealthStatus(Protocol):
    """What the watcher needs of ``grpc_health.v1.health.aio.HealthServicer``."""

    async def set(self, service: str, status: Any) -> None: ...


class HealthWatcher:
    """Flips the health service to NOT_SERVING while ``probe`` says a dependency is away, and back
    to SERVING when it returns; probes every ``interval`` seconds on ``clock``.

    ``probe`` returns whether every dependency answers; raising, or taking longer than
    ``probe_timeout``, counts as "no". ``async with`` starts it; ``close()`` (idempotent) stops it.

    ``degraded`` (optional) names what works only in part (e.g. a provider credential whose
    breaker is open: its tasks fail at once, every other one runs). Degraded is not down: the
    service stays SERVING (a load balancer must keep routing to it; another replica would be no
    better off), and :attr:`degraded` holds the reasons for an HTTP health route to show.
    """

    def __init__(
        self,
        health: HealthStatus,
        service_names: Sequence[str],
        probe: Callable[[], Awaitable[bool]],
        *,
        interval: float = HEALTH_INTERVAL_S,
        probe_timeout: float | None = None,
        clock: Clock = SYSTEM,
        degraded: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._health = health
        #: "" is the whole server's status (what a probe without a service name asks for).
        self._names = (*service_names, "")
        self._probe = probe
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._clock = clock
        #: The last verdict (the health service starts SERVING).
        self.serving = True
        self._degraded_probe = degraded
        #: What works only in part, as of the last probe (empty: nothing).
        self.degraded: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-watcher")

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            await self.check()

    async def check(self) -> bool:
        """Probes once and sets the health status when the verdict changed; returns it."""
        try:
            async with asyncio.timeout(self._probe_timeout):
                ok = bool(await self._probe())
        except Exception:  # a failing or hanging probe means a dependency is not answering
            ok = False
        self._check_degraded()
        if ok != self.serving:
            self.serving = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._names:
                await self._health.set(name, status)
            log.warning("health_changed", serving=ok)
        return ok

    def _check_degraded(self) -> None:
        if self._degraded_probe is None:
            return
        try:
            degraded = tuple(self._degraded_probe())
        except Exception:  # a failing degraded probe must not take the service down
            degraded = ()
        if degraded != self.degraded:
            self.degraded = degraded
            log.warning("health_degraded" if degraded else "health_not_degraded", reasons=list(degraded))

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # a cancel of close() itself propagates

    async def __aenter__(self) -> HealthWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
