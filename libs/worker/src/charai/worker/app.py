"""Composition root shared by the workers: NATS, media bucket, task_store client, provider HTTP."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable

import aiohttp
import structlog
from charai.core import natsconn
from charai.core.domain.breaker import BreakerState
from charai.core.domain.provider_events import BreakerPolicy
from charai.core.domain.provider_limit import trial_window
from charai.core.domain.provider_record import ProviderRecord, credential_id
from charai.core.lifecycle import ServiceApp, run_until_signal
from charai.core.media import MediaStore
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from charai.core.provider_kv import RecordStore, ensure_providers_bucket
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.worker.context import Handler
from charai.worker.gate_sync import GateSync
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.runtime import JobRunner, RunnerConfig
from charai.worker.settings import WorkerSettings
from charai.worker.shared_gate import SharedGate
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import Gauge

log = structlog.get_logger("worker")


class WorkerApp(ServiceApp):
    """One worker process: ``async with WorkerApp(...)`` runs it until closed.

    Its parts are entered into one :class:`contextlib.AsyncExitStack`, so a start that fails
    half-way closes exactly what it opened and ``close()`` (idempotent) undoes the rest in reverse
    order of entry: the job runner first (it stops taking jobs; in-flight ones finish within the
    grace or are handed back), the metrics endpoint, the shared provider gate (its holding leaves
    the record), the provider HTTP session, the task_store client, NATS.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        kind: str,
        handler: Handler,
        provider: ProviderConfig,
        concurrency: int,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._kind = kind
        self._handler = handler
        self._provider_config = provider
        self._concurrency = concurrency
        self.runner: JobRunner | None = None
        #: The provider credential's shared limiter and breaker (``None``: per-process gate).
        self.gate: SharedGate | None = None
        self._nc: Client | None = None
        self._session: aiohttp.ClientSession | None = None
        self._store: StoreClient | None = None
        #: This process's metrics (served on ``CHARAI_METRICS_ADDR`` when set).
        self.metrics = Metrics(f"{kind}_worker")
        self._metrics_endpoint: MetricsEndpoint | None = None

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        topology = Topology(s.namespace)
        self._nc = nc = await natsconn.connect(s.nats_url, f"charai-{self._kind}-worker")
        stack.push_async_callback(natsconn.drain, nc)
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, topology, s.nats_replicas)
        bucket = await natsconn.ensure_media_bucket(js, topology, s.nats_replicas)
        self._store = store = await stack.enter_async_context(
            StoreClient(
                s.task_store_addr,
                s.internal_token.get_secret_value(),
                coalesce=True,
                stream=s.exchange_stream,
            )
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        if s.provider_shared_limits:
            self.gate = await self._shared_gate(stack, nc, js, topology)
        provider = ProviderHttp(session, self._provider_config, self.gate)
        calls = self.metrics.provider_call_duration
        provider.observe = lambda op, outcome, seconds: calls.labels(self._kind, op, outcome).observe(seconds)
        config = RunnerConfig(
            kind=self._kind,
            concurrency=self._concurrency,
            ack_wait=s.ack_wait_seconds,
            max_deliver=s.max_deliver,
            heartbeat_interval=max(0.2, s.ack_wait_seconds / 3),
            long_poll_seconds=s.long_poll_seconds,
            progress_coalesce=s.progress_coalesce_seconds,
            store_calls=s.store_calls_in_flight,
            worker_id=s.worker_id,
            replicas=s.nats_replicas,
        )
        self.runner = runner = JobRunner(
            config,
            self._handler,
            nc,
            js,
            store,
            MediaStore(bucket, js, topology.media_bucket),
            provider,
            topology,
        )
        self._metrics_endpoint = await stack.enter_async_context(
            MetricsEndpoint(
                self.metrics,
                s.metrics_addr,
                live=[
                    (self.metrics.jobs_in_flight.labels(self._kind), lambda: runner.in_flight),
                    *self._provider_gauges(),
                ],
            )
        )
        # Closed first (entered last): on SIGTERM the runner stops taking jobs before anything
        # else is awaited, so no job starts once draining began.
        stack.push_async_callback(runner.close, s.shutdown_grace_seconds)
        await runner.start()
        log.info(
            "provider_configured",
            base_url=self._provider_config.base_url,
            model=self._provider_config.model,
            key_set=bool(self._provider_config.api_key),
            credential=self._identity().credential,
            shared_limits=self.gate is not None,
        )

    def _identity(self) -> ProviderRecord:
        """The provider credential this worker calls (its id hashes the key; never the key)."""
        p = self._provider_config
        return ProviderRecord(
            credential=credential_id(p.dialect, p.base_url, p.api_key),
            kind=self._kind,
            dialect=p.dialect,
            model=p.model,
        )

    async def _shared_gate(
        self, stack: contextlib.AsyncExitStack, nc: Client, js: JetStreamContext, topology: Topology
    ) -> SharedGate:
        """The credential's limiter and breaker, shared with every worker through NATS KV."""
        s = self.settings
        base = self._identity()
        gate = SharedGate(
            base,
            holder=f"{s.worker_id}-{uuid.uuid4().hex[:6]}",
            key_setting=self._provider_config.key_setting,
            policy=BreakerPolicy(
                base=s.provider_breaker_backoff_seconds,
                cap=max(s.provider_breaker_backoff_seconds, s.provider_breaker_max_backoff_seconds),
                probe_timeout=self._provider_config.timeout + 30.0,
            ),
            lease=s.provider_lease_seconds,
            trial_seconds=trial_window(self._provider_config.timeout),
        )
        kv = await ensure_providers_bucket(js, topology, s.nats_replicas)
        await stack.enter_async_context(
            GateSync(gate, RecordStore(kv, base.key), connected=lambda: nc.is_connected)
        )
        return gate

    def _provider_gauges(self) -> list[tuple[Gauge, Callable[[], float]]]:
        gate = self.gate
        if gate is None:
            return []
        labels = (self._kind, gate.base.credential, gate.base.model)
        m = self.metrics
        states = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
        return [
            (m.provider_breaker_state.labels(*labels), lambda: states[gate.view.breaker.state]),
            (m.provider_limit.labels(*labels), lambda: float(gate.limit or 0)),
            (m.provider_in_flight.labels(*labels), lambda: float(gate.cluster_in_flight)),
        ]

    @property
    def metrics_port(self) -> int:
        """The bound ``/metrics`` port (0: metrics not served)."""
        return 0 if self._metrics_endpoint is None else self._metrics_endpoint.port


async def serve(app: WorkerApp) -> None:
    await run_until_signal(app, "worker")
