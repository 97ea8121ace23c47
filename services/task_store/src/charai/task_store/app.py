"""Composition root of task_store: build the store, NATS, relay and gRPC server; run; drain."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import structlog
from charai.core import grpcsupport, logs, natsconn
from charai.core.clock import SYSTEM, Clock
from charai.core.domain.provider_models import ProviderModels
from charai.core.domain.retry import RetryPolicy
from charai.core.health import HealthWatcher
from charai.core.keys import keys
from charai.core.lifecycle import ServiceApp, run_until_signal
from charai.core.media import MediaStore
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from charai.core.provider_kv import ProviderStates
from charai.core.settings import refuse
from charai.core.storechannel import INTERNAL_MAX_MESSAGE_BYTES
from charai.core.timestamps import micros
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2, store_service_pb2_grpc
from charai.task_store.backlog import FairConfig
from charai.task_store.dispatch import EventPublisher, OutboxRelay
from charai.task_store.grpc_api import TaskStoreServicer, internal_auth
from charai.task_store.push import Offers
from charai.task_store.release import Releaser
from charai.task_store.removal import RetentionSweeper
from charai.task_store.reuse import ReuseConfig
from charai.task_store.settings import Settings
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.task_store.usage import UsageConfig
from charai.task_store.webhooks import WebhookConfig
from charai.taskapi import error_code_label, priority_label, type_label
from charai.tasks.v1 import task_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext

log = structlog.get_logger("task_store")

#: The generated webhook signing key's file, inside ``CHARAI_DATA_DIR``.
WEBHOOK_KEY_FILE = "webhook-signing.key"
#: How long a health probe of NATS and the database may take.
HEALTH_PROBE_TIMEOUT_S = 2.0
#: How often the queue gauges are refreshed from the database (only when metrics are on).
GAUGE_REFRESH_S = 5.0
_SERVICE = store_service_pb2.DESCRIPTOR.services_by_name["TaskStoreService"].full_name


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
            reason = error_code_label(task.error.code)
            metrics.task_retries.labels(kind, reason).inc()
        elif event.type == task_pb2.TASK_EVENT_TYPE_COMPLETED:
            metrics.tasks_completed.labels(kind).inc()
            ended = "completed"
        elif event.type == task_pb2.TASK_EVENT_TYPE_FAILED:
            code = error_code_label(task.error.code)
            metrics.tasks_failed.labels(kind, code).inc()
            ended = "failed"
        elif event.type == task_pb2.TASK_EVENT_TYPE_CANCELLED:
            metrics.tasks_cancelled.labels(kind).inc()
            ended = "cancelled"
        if ended:
            seconds = (micros(event.time) - micros(task.create_time)) / 1e6
            metrics.task_duration.labels(kind, ended).observe(max(0.0, seconds))


class TaskStoreApp(ServiceApp):
    """Everything task_store runs, as one ``async with``-able component.

    Its parts are entered into one :class:`contextlib.AsyncExitStack`, so a start that fails
    half-way closes exactly what it opened and ``close()`` (idempotent) undoes the rest in reverse
    order of entry: the health watcher and the metrics endpoint, the gRPC server (calls in flight
    finish within the grace), the fair-share releaser, the outbox relay (gives back what it
    holds), the event publisher (flushes), the store, NATS.
    """

    stopped = "task_store_stopped"

    def __init__(self, settings: Settings, listen_addr: str | None = None, *, clock: Clock = SYSTEM) -> None:
        super().__init__()
        self.settings = settings
        self._listen = listen_addr or settings.listen_addr
        self._topology = Topology(settings.namespace)
        self._clock = clock
        self.port = 0
        self._relay: OutboxRelay | None = None
        self._nc: Client | None = None
        self.store: TaskStore | None = None
        #: Workers' standing offers while push dispatch is on (CHARAI_PUSH_DISPATCH).
        self.offers: Offers | None = None
        #: This process's metrics (always collected; exposed when ``CHARAI_METRICS_ADDR`` is set).
        self.metrics = Metrics("task_store")
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._health_watcher: HealthWatcher | None = None
        #: Releases held tasks in fair order between tenants (:mod:`charai.task_store.backlog`).
        self.releaser: Releaser | None = None
        #: Deletes ended tasks after ``CHARAI_RETENTION_DAYS`` (idle when 0).
        self.retention: RetentionSweeper | None = None

    @property
    def serving(self) -> bool:
        """Last health verdict (True: SERVING), for logs and tests."""
        return self._health_watcher is not None and self._health_watcher.serving

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        publisher: EventPublisher | None = None
        releaser: Releaser | None = None

        def on_events(envelopes: list[store_service_pb2.EventEnvelope]) -> None:
            assert publisher is not None
            publisher.submit_threadsafe(envelopes)
            record_events(self.metrics, envelopes)
            if releaser is not None:  # claims and ends make room in the buffer of released jobs
                releaser.observe(envelopes)

        # Built (not opened) first: a bad database setting stops start-up before anything connects.
        self.store = store = self._build_store(on_events)
        self._nc = nc = await natsconn.connect(s.nats_url, "charai-task-store")
        stack.push_async_callback(natsconn.drain, nc)
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, self._topology, s.nats_replicas)
        publisher = EventPublisher(nc, self._topology)
        stack.push_async_callback(store.close)
        await store.open()
        stack.push_async_callback(publisher.close)
        publisher.start()
        relay = self._start_relay(stack, store, js)
        # Closed before the relay (entered after it): its last releases are handed to the relay.
        self.releaser = releaser = await stack.enter_async_context(Releaser(store))
        # DeleteTask and the retention sweeper remove media too (media first, then the task).
        media = MediaStore(await natsconn.ensure_media_bucket(js, self._topology, s.nats_replicas))
        self.retention = retention = RetentionSweeper(store, media, s.retention_days, self._clock)
        stack.push_async_callback(retention.close)
        retention.start()
        servicer = TaskStoreServicer(
            store, relay.wake, s.lease_seconds, ProviderModels.of(s), media, self.metrics
        )
        # GetQueueStats shows the provider credentials' shared limiters and breakers (NATS KV).
        providers = await stack.enter_async_context(ProviderStates(nc, self._topology, s.nats_replicas))
        servicer.providers = providers.protos
        if s.push_dispatch:
            servicer.offers = self.offers = offers = store.push_dispatch()
            offers.on_sent = self.metrics.jobs_pushed.inc
            self.metrics.gauge_from(self.metrics.push_offers, lambda: offers.open)
        self.metrics.gauge_from(self.metrics.exchange_streams, lambda: servicer.drain.open_streams)
        health = await self._serve(stack, servicer)
        await self._start_ops(stack, health)
        host = self._listen.rpartition(":")[0]
        logs.announce("task_store_listening", addr=f"{host}:{self.port}", database=store.describe())

    def _start_relay(
        self, stack: contextlib.AsyncExitStack, store: TaskStore, js: JetStreamContext
    ) -> OutboxRelay:
        s = self.settings
        self._relay = relay = OutboxRelay(
            store, js, self._topology, s.redispatch_after_seconds, s.sweep_interval_seconds, self._clock
        )
        # New jobs go straight to this relay after their create commits (no claim in between).
        store.hand_off(relay.owner, relay.take_threadsafe)
        store.on_outbox(relay.wake_threadsafe)  # webhook deliveries that are due
        disabled = self.metrics.webhook_endpoints_disabled
        store.webhooks.on_disabled = lambda tenant, host: disabled.labels(host).inc()
        stack.push_async_callback(relay.close)
        relay.start()
        relay.wake()  # publish whatever a previous run left in the outbox
        return relay

    async def _serve(self, stack: contextlib.AsyncExitStack, servicer: TaskStoreServicer) -> Any:
        """The gRPC server (the internal API, health, reflection) on its port; returns its health
        servicer."""
        s = self.settings
        server = grpc.aio.server(
            interceptors=[
                grpcsupport.ServerInterceptor(
                    internal_auth(s.internal_token.get_secret_value()),
                    observe=self.metrics.observe_rpc,
                    max_request_bytes=INTERNAL_MAX_MESSAGE_BYTES,
                )
            ],
            options=grpcsupport.internal_server_options(),
        )
        store_service_pb2_grpc.add_TaskStoreServiceServicer_to_server(servicer, server)
        health = await grpcsupport.add_health_and_reflection(server, [_SERVICE])
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise SystemExit(f"task_store: cannot listen on {self._listen} (CHARAI_TASK_STORE_ADDR)")
        stack.push_async_callback(server.stop, s.shutdown_grace_seconds)
        # Runs first (last pushed): open ExchangeStream calls end once answered, not at the grace.
        stack.callback(servicer.drain.start)
        await server.start()
        return health

    async def _start_ops(self, stack: contextlib.AsyncExitStack, health: Any) -> None:
        """/metrics (when configured) and the health watcher."""
        self._metrics_endpoint = await stack.enter_async_context(
            MetricsEndpoint(
                self.metrics,
                self.settings.metrics_addr,
                refresh=self._refresh_gauges,
                refresh_every=GAUGE_REFRESH_S,
                clock=self._clock,
            )
        )
        self._health_watcher = await stack.enter_async_context(
            HealthWatcher(
                health,
                [_SERVICE],
                self._dependencies_ok,
                probe_timeout=HEALTH_PROBE_TIMEOUT_S,
                clock=self._clock,
            )
        )

    @property
    def metrics_port(self) -> int:
        """The bound ``/metrics`` port (0: metrics not served)."""
        return 0 if self._metrics_endpoint is None else self._metrics_endpoint.port

    async def _dependencies_ok(self) -> bool:
        """NATS connected and the database answering a trivial query (in time: the watcher
        gives up on a probe after ``HEALTH_PROBE_TIMEOUT_S``)."""
        if self._nc is None or not self._nc.is_connected or self.store is None:
            return False
        await self.store.backend.read(lambda tx: tx.fetchval("SELECT 1"))
        return True

    async def _refresh_gauges(self) -> None:
        """Queue gauges from the shared database (the same on every replica)."""
        assert self.store is not None
        try:
            lanes, backlog = await self.store.queue_gauges()
        except Exception as exc:  # the database is away: keep the last values, try again
            log.warning("queue_gauges_failed", error=str(exc))
            return
        m = self.metrics
        for lane in lanes:
            labels = (type_label(lane.type), priority_label(lane.priority))
            m.queue_depth.labels(*labels).set(lane.depth)
            m.queue_waiting_retry.labels(*labels).set(lane.waiting_retry)
            m.queue_in_flight.labels(*labels).set(lane.in_flight)
        m.outbox_backlog.set(backlog)

    @property
    def relay(self) -> OutboxRelay | None:
        """The outbox relay (tests and metrics read its counters)."""
        return self._relay

    def _build_store(self, on_events: Callable[[list[store_service_pb2.EventEnvelope]], None]) -> TaskStore:
        """The store ``CHARAI_DATABASE_URL`` names; a bad setting stops start-up with a message
        naming it (and never the URL itself, which may carry a password)."""
        s = self.settings
        config = StoreConfig(
            max_attempts=s.max_attempts,
            lease_seconds=s.lease_seconds,
            retry=RetryPolicy(
                base=s.retry_base_seconds, cap=s.retry_cap_seconds, max_attempts=s.max_attempts
            ),
            namespace=s.namespace,
            outbox_claim_seconds=s.outbox_claim_seconds,
            usage=self._usage_config(),
            fair=self._fair_config(),
            reuse=ReuseConfig(
                ttl_seconds=s.reuse_ttl_seconds,
                tts_provider=s.tts_provider,
                tts_model=s.tts_model,
                image_provider=s.image_provider,
                image_model=s.image_model,
            ),
            webhooks=WebhookConfig(
                signing_key=keys(s.webhook_signing_key.get_secret_value(), s.data_dir, WEBHOOK_KEY_FILE)[0],
                schedule=s.webhook_schedule(),
                disable_after=s.webhook_disable_after,
                progress_interval_seconds=s.webhook_progress_interval_ms / 1000,
                secret_grace_seconds=s.webhook_secret_grace_seconds,
                claim_seconds=s.webhook_claim_seconds,
            ),
        )
        try:
            url = s.resolved_database_url()
            password = s.database_password() if s.is_postgres() and urlsplit(url).password is None else None
        except ValueError as exc:
            refuse(f"task_store: {exc}")
        return open_store(
            url, config, on_events, password=password, pool_size=s.database_pool_size, clock=self._clock
        )

    def _usage_config(self) -> UsageConfig:
        """Budgets (``CHARAI_TENANTS_FILE``) and prices (``CHARAI_PRICES_FILE``); a bad file stops
        start-up with a message naming the setting and the entry."""
        try:
            return UsageConfig(self.settings.tenants(), self.settings.prices())
        except ValueError as exc:
            refuse(f"task_store: {exc}")

    def _fair_config(self) -> FairConfig:
        """Fair share: tenants' weights (``CHARAI_TENANTS_FILE``; a bad file stops start-up with
        its message), the buffer of released jobs and the priority aging."""
        s = self.settings
        try:
            tenants = s.tenants()
        except ValueError as exc:
            refuse(f"task_store: {exc}")
        return FairConfig(
            tenants, s.dispatch_buffer, s.priority_aging_seconds, round_seconds=s.dispatch_round_ms / 1000
        )


async def serve(settings: Settings) -> None:
    await run_until_signal(TaskStoreApp(settings), "task_store")
