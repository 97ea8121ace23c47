"""Composition root of task_store: build the store, NATS, relay and gRPC server; run; drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import structlog
from charai.core import grpcsupport, logs, natsconn
from charai.core.domain.retry import RetryPolicy
from charai.core.lifecycle import run_until_signal
from charai.core.metrics import Metrics, MetricsServer
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2, store_service_pb2_grpc
from charai.task_store.dispatch import EventPublisher, OutboxRelay
from charai.task_store.grpc_api import TaskStoreServicer, internal_auth
from charai.task_store.settings import Settings
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2
from grpc_health.v1 import health_pb2
from nats.aio.client import Client

log = structlog.get_logger("task_store")
#: How often the health watcher probes NATS and the database, and how long a probe may take.
HEALTH_INTERVAL_S = 1.0
HEALTH_PROBE_TIMEOUT_S = 2.0
#: How often the queue gauges are refreshed from the database (only when metrics are on).
GAUGE_REFRESH_S = 5.0
_SERVICE = store_service_pb2.DESCRIPTOR.services_by_name["TaskStoreService"].full_name


def label(enum: Any, value: int, prefix: str) -> str:
    """``TASK_TYPE_IMAGE_GENERATION`` → ``image_generation``: short, stable label values."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def type_label(value: int) -> str:
    return label(task_pb2.TaskType, value, "TASK_TYPE_")


def priority_label(value: int) -> str:
    return label(task_pb2.Priority, value, "PRIORITY_")


def record_events(metrics: Metrics, envelopes: list[store_service_pb2.EventEnvelope]) -> None:
    """Counts committed transitions (called right after commit, from the database thread on
    SQLite: prometheus-client's metrics are thread-safe). The replica that commits an event
    counts it, so the sum over replicas counts each transition once."""
    for env in envelopes:
        event, task = env.event, env.event.task
        kind = type_label(task.type)
        ended = ""
        if event.type == task_pb2.TASK_EVENT_TYPE_QUEUED and env.prev_sequence == 0:
            metrics.tasks_created.labels(kind).inc()
        elif event.type == task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED:
            reason = label(task_pb2.ErrorCode, task.error.code, "ERROR_CODE_")
            metrics.task_retries.labels(kind, reason).inc()
        elif event.type == task_pb2.TASK_EVENT_TYPE_COMPLETED:
            metrics.tasks_completed.labels(kind).inc()
            ended = "completed"
        elif event.type == task_pb2.TASK_EVENT_TYPE_FAILED:
            code = label(task_pb2.ErrorCode, task.error.code, "ERROR_CODE_")
            metrics.tasks_failed.labels(kind, code).inc()
            ended = "failed"
        elif event.type == task_pb2.TASK_EVENT_TYPE_CANCELLED:
            metrics.tasks_cancelled.labels(kind).inc()
            ended = "cancelled"
        if ended:
            seconds = (event.time.ToMicroseconds() - task.create_time.ToMicroseconds()) / 1e6
            metrics.task_duration.labels(kind, ended).observe(max(0.0, seconds))


class TaskStoreApp:
    """Everything task_store runs, as one ``async with``-able component."""

    def __init__(self, settings: Settings, listen_addr: str | None = None) -> None:
        self.settings = settings
        self._listen = listen_addr or settings.listen_addr  # one HOST:PORT: the settings check it
        self._topology = Topology(settings.namespace)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._publisher: EventPublisher | None = None
        self._relay: OutboxRelay | None = None
        self._nc: Client | None = None
        self.store: TaskStore | None = None
        self._closed = False
        #: This process's metrics (always collected; exposed when ``CHARAI_METRICS_ADDR`` is set).
        self.metrics = Metrics("task_store")
        self._metrics_server: MetricsServer | None = None
        self._health: Any = None
        self._background: list[asyncio.Task[None]] = []
        #: Last health verdict (True: SERVING), for logs and tests.
        self.serving = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()  # what started so far (NATS, the pool) is let go
            raise

    async def _start(self) -> None:
        s = self.settings

        def on_events(envelopes: list[store_service_pb2.EventEnvelope]) -> None:
            assert self._publisher is not None
            self._publisher.submit_threadsafe(envelopes)
            record_events(self.metrics, envelopes)

        config = StoreConfig(
            max_attempts=s.max_attempts,
            lease_seconds=s.lease_seconds,
            retry=RetryPolicy(
                base=s.retry_base_seconds, cap=s.retry_cap_seconds, max_attempts=s.max_attempts
            ),
            namespace=s.namespace,
            outbox_claim_seconds=s.outbox_claim_seconds,
        )
        # Built (not opened) first: a bad database setting stops start-up before anything connects.
        self.store = self._build_store(config, on_events)
        self._nc = await natsconn.connect(s.nats_url, "charai-task-store")
        js = self._nc.jetstream()
        await natsconn.ensure_jobs_stream(js, self._topology, s.nats_replicas)
        self._publisher = EventPublisher(self._nc, self._topology)
        await self.store.open()
        self._relay = OutboxRelay(
            self.store, js, self._topology, s.redispatch_after_seconds, s.sweep_interval_seconds
        )
        # New jobs go straight to this relay after their create commits (no claim in between).
        self.store.hand_off(self._relay.owner, self._relay.take_threadsafe)
        self._publisher.start()
        self._relay.start()
        self._relay.wake()  # publish whatever a previous run left in the outbox

        server = grpc.aio.server(
            interceptors=[
                grpcsupport.ServerInterceptor(
                    internal_auth(s.internal_token.get_secret_value()), observe=self.metrics.observe_rpc
                )
            ],
            options=grpcsupport.SERVER_OPTIONS,
        )
        store_service_pb2_grpc.add_TaskStoreServiceServicer_to_server(
            TaskStoreServicer(self.store, self._relay.wake, s.lease_seconds, s.image_model), server
        )
        self._health = await grpcsupport.add_health_and_reflection(server, [_SERVICE])
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise SystemExit(f"task_store: cannot listen on {self._listen} (CHARAI_TASK_STORE_ADDR)")
        await server.start()
        self._server = server
        self.serving = True
        self._background.append(asyncio.create_task(self._watch_health(), name="health-watcher"))
        if s.metrics_addr:
            self._metrics_server = MetricsServer(self.metrics, s.metrics_addr)
            self._background.append(asyncio.create_task(self._refresh_gauges(), name="queue-gauges"))
            log.info("metrics_listening", port=self._metrics_server.port)
        host = self._listen.rpartition(":")[0]
        logs.announce("task_store_listening", addr=f"{host}:{self.port}", database=self.store.describe())

    @property
    def metrics_port(self) -> int:
        """The bound ``/metrics`` port (0: metrics not served)."""
        return 0 if self._metrics_server is None else self._metrics_server.port

    async def _dependencies_ok(self) -> bool:
        """NATS connected and the database answering a trivial query in time."""
        if self._nc is None or not self._nc.is_connected or self.store is None:
            return False
        try:
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
                await self.store.backend.read(lambda tx: tx.fetchval("SELECT 1"))
        except Exception:
            return False
        return True

    async def _watch_health(self) -> None:
        """Flips gRPC health to NOT_SERVING while NATS or the database is out of reach (a load
        balancer then sends calls to a replica that can serve them), and back when both are."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            ok = await self._dependencies_ok()
            if ok == self.serving:
                continue
            self.serving = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in (_SERVICE, ""):
                await self._health.set(name, status)
            log.warning("health_changed", serving=ok)

    async def _refresh_gauges(self) -> None:
        """Queue gauges from the shared database (the same on every replica)."""
        while True:
            assert self.store is not None
            try:
                lanes, backlog = await self.store.queue_stats()
            except Exception as exc:  # the database is away: keep the last values, try again
                log.warning("queue_gauges_failed", error=str(exc))
            else:
                m = self.metrics
                for lane in lanes:
                    labels = (type_label(lane.type), priority_label(lane.priority))
                    m.queue_depth.labels(*labels).set(lane.depth)
                    m.queue_waiting_retry.labels(*labels).set(lane.waiting_retry)
                    m.queue_in_flight.labels(*labels).set(lane.in_flight)
                m.outbox_backlog.set(backlog)
            await asyncio.sleep(GAUGE_REFRESH_S)

    @property
    def relay(self) -> OutboxRelay | None:
        """The outbox relay (tests and metrics read its counters)."""
        return self._relay

    def _build_store(
        self, config: StoreConfig, on_events: Callable[[list[store_service_pb2.EventEnvelope]], None]
    ) -> TaskStore:
        """The store ``CHARAI_DATABASE_URL`` names; a bad setting stops start-up with a message
        naming it (and never the URL itself, which may carry a password)."""
        s = self.settings
        try:
            url = s.resolved_database_url()
            password = s.database_password() if s.is_postgres() and urlsplit(url).password is None else None
        except ValueError as exc:
            raise SystemExit(f"task_store: {exc}") from None
        return open_store(url, config, on_events, password=password, pool_size=s.database_pool_size)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_seconds)
        if self._relay is not None:
            await self._relay.close()
        if self._publisher is not None:
            await self._publisher.close()
        if self.store is not None:
            await self.store.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        logs.announce("task_store_stopped")

    async def __aenter__(self) -> TaskStoreApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(settings: Settings) -> None:
    await run_until_signal(TaskStoreApp(settings), "task_store")
