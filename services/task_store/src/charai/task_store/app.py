"""Composition root of task_store: build the store, NATS, relay and gRPC server; run; drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from urllib.parse import urlsplit

import grpc
import structlog
from charai.core import grpcsupport, logs, natsconn
from charai.core.domain.retry import RetryPolicy
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2, store_service_pb2_grpc
from charai.task_store.dispatch import EventPublisher, OutboxRelay
from charai.task_store.grpc_api import TaskStoreServicer, internal_auth
from charai.task_store.settings import Settings
from charai.task_store.store import StoreConfig, TaskStore, open_store
from nats.aio.client import Client

log = structlog.get_logger("task_store")


class TaskStoreApp:
    """Everything task_store runs, as one ``async with``-able component."""

    def __init__(self, settings: Settings, listen_addr: str | None = None) -> None:
        self.settings = settings
        self._listen = listen_addr or settings.task_store_addr
        self._topology = Topology(settings.namespace)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._publisher: EventPublisher | None = None
        self._relay: OutboxRelay | None = None
        self._nc: Client | None = None
        self.store: TaskStore | None = None
        self._closed = False

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
        self._nc = await natsconn.connect(s.nats_servers, "charai-task-store")
        js = self._nc.jetstream()
        await natsconn.ensure_jobs_stream(js, self._topology, s.nats_replicas)
        self._publisher = EventPublisher(self._nc, self._topology)
        relay_box: list[OutboxRelay] = []
        await self.store.open()
        self._relay = OutboxRelay(
            self.store, js, self._topology, s.redispatch_after_seconds, s.sweep_interval_seconds
        )
        relay_box.append(self._relay)
        self._publisher.start()
        self._relay.start()
        self._relay.wake()  # publish whatever a previous run left in the outbox

        server = grpc.aio.server(
            interceptors=[grpcsupport.ServerInterceptor(internal_auth(s.internal_token))],
            options=grpcsupport.SERVER_OPTIONS,
        )
        store_service_pb2_grpc.add_TaskStoreServiceServicer_to_server(
            TaskStoreServicer(self.store, self._relay.wake, s.lease_seconds, s.image_model), server
        )
        await grpcsupport.add_health_and_reflection(
            server, [store_service_pb2.DESCRIPTOR.services_by_name["TaskStoreService"].full_name]
        )
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise SystemExit(f"task_store: cannot listen on {self._listen} (CHARAI_TASK_STORE_ADDR)")
        await server.start()
        self._server = server
        host = self._listen.rpartition(":")[0]
        logs.announce("task_store_listening", addr=f"{host}:{self.port}", database=self.store.describe())

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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with TaskStoreApp(settings):
        await stop.wait()
        log.info("task_store_draining")
