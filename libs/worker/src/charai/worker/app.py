"""Composition root shared by the workers: NATS, media bucket, task_store client, provider HTTP."""

from __future__ import annotations

import contextlib

import aiohttp
import structlog
from charai.core import natsconn
from charai.core.lifecycle import run_until_signal
from charai.core.media import MediaStore
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.worker.context import Handler
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.runtime import JobRunner, RunnerConfig
from charai.worker.settings import WorkerSettings
from nats.aio.client import Client

log = structlog.get_logger("worker")


class WorkerApp:
    """One worker process: ``async with WorkerApp(...)`` runs it until closed.

    Its parts are entered into one :class:`contextlib.AsyncExitStack`, so a start that fails
    half-way closes exactly what it opened and ``close()`` (idempotent) undoes the rest in reverse
    order of entry: the job runner first (it stops taking jobs; in-flight ones finish within the
    grace or are handed back), the metrics endpoint, the provider HTTP session, the task_store
    client, NATS.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        kind: str,
        handler: Handler,
        provider: ProviderConfig,
        concurrency: int,
    ) -> None:
        self.settings = settings
        self._kind = kind
        self._handler = handler
        self._provider_config = provider
        self._concurrency = concurrency
        self.runner: JobRunner | None = None
        self._nc: Client | None = None
        self._session: aiohttp.ClientSession | None = None
        self._store: StoreClient | None = None
        #: This process's metrics (served on ``CHARAI_METRICS_ADDR`` when set).
        self.metrics = Metrics(f"{kind}_worker")
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._exit = contextlib.AsyncExitStack()
        self._closed = False

    async def start(self) -> None:
        try:
            await self._open(self._exit)
        except BaseException:
            await self.close()  # what was opened so far, and only that
            raise

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        topology = Topology(s.namespace)
        self._nc = nc = await natsconn.connect(s.nats_url, f"charai-{self._kind}-worker")
        stack.push_async_callback(natsconn.drain, nc)
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, topology, s.nats_replicas)
        bucket = await natsconn.ensure_media_bucket(js, topology, s.nats_replicas)
        self._store = store = await stack.enter_async_context(
            StoreClient(s.task_store_addr, s.internal_token.get_secret_value(), coalesce=True)
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        provider = ProviderHttp(session, self._provider_config)
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
            config, self._handler, nc, js, store, MediaStore(bucket), provider, topology
        )
        self._metrics_endpoint = await stack.enter_async_context(
            MetricsEndpoint(
                self.metrics,
                s.metrics_addr,
                live=[(self.metrics.jobs_in_flight.labels(self._kind), lambda: runner.in_flight)],
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
        )

    async def close(self) -> None:
        """Stops what :meth:`start` opened, in the documented order; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._exit.aclose()

    @property
    def metrics_port(self) -> int:
        """The bound ``/metrics`` port (0: metrics not served)."""
        return 0 if self._metrics_endpoint is None else self._metrics_endpoint.port

    async def __aenter__(self) -> WorkerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(app: WorkerApp) -> None:
    await run_until_signal(app, "worker")
