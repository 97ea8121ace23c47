"""Composition root of the gateway: gRPC port, HTTP port, event hub, task_store client.

Every part is entered into one :class:`contextlib.AsyncExitStack`, so a start that fails half-way
closes exactly what it opened, and ``close()`` undoes the rest in reverse order of entry. The
parts are entered so that shutdown runs: end the watch streams, stop the health watcher, health
NOT_SERVING, stop the gRPC server with its grace (bridged HTTP calls finish too: the HTTP port is
still up), the HTTP runner, the loopback channel, the event hub, the task_store client, NATS.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from urllib.parse import urlsplit

import grpc
import structlog
from aiohttp import web
from charai.core import grpcsupport, logs, natsconn
from charai.core.clock import SYSTEM, Clock
from charai.core.domain.provider_models import ProviderModels
from charai.core.health import HealthWatcher
from charai.core.lifecycle import ServiceApp, run_until_signal
from charai.core.media import MediaStore, UrlSigner
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from charai.core.provider_kv import ProviderStates
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.gateway import processes
from charai.gateway.auth import Authenticator
from charai.gateway.events import EventHub
from charai.gateway.grpcweb import GrpcWebBridge, loopback_channel
from charai.gateway.http import (
    CorsPolicy,
    LoopbackHosts,
    console_routes,
    health_routes,
    install_cors,
    media_routes,
)
from charai.gateway.limits import SubmitLimiter
from charai.gateway.ops import metrics_routes
from charai.gateway.rest import MAX_BODY_BYTES, RestApi
from charai.gateway.rest.errors import json_not_found
from charai.gateway.service import TaskService, add_to_server
from charai.gateway.settings import Settings
from charai.gateway.signing import access_tokens, url_signer
from charai.gateway.tls import TlsFiles, load_tls
from charai.gateway.tokens import AccessTokens
from charai.tasks.v1 import task_service_pb2
from nats.aio.client import Client

log = structlog.get_logger("gateway")
_SERVICE = task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name


class GatewayApp(ServiceApp):
    """The gateway process as one ``async with``-able component.

    ``process``: this process's index among the gateway's processes (``CHARAI_GATEWAY_PROCESSES``,
    started by :mod:`charai.gateway.processes`); None when it is the only one. One of several binds
    the public ports with SO_REUSEPORT, bridges gRPC-web and REST through a loopback port of its
    own (the shared one could lead to another process), serves ``/metrics`` on its own port
    (:meth:`Settings.metrics_addr_of`) and says ``gateway_process_listening`` (the parent says
    ``gateway_listening`` once every process listens).
    """

    stopped = "gateway_stopped"

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM, process: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._clock = clock
        self.process = process
        self.grpc_port = 0
        self.http_port = 0
        #: The plaintext loopback-only gRPC port the HTTP bridge uses when the public one is TLS
        #: or shared by several processes.
        self.bridge_port = 0
        #: This process's own ``/metrics`` port (0: ``CHARAI_METRICS_ADDR`` unset).
        self.metrics_port = 0
        self.service: TaskService | None = None
        self.hub: EventHub | None = None
        #: This process's Prometheus metrics (``GET /metrics`` on the HTTP port).
        self.metrics = Metrics("gateway")
        self.health_watcher: HealthWatcher | None = None
        self._nc: Client | None = None
        #: gRPC-web and REST reach the servicer through the gateway's own gRPC port.
        self._loopback: grpc.aio.Channel | None = None

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        tokens = access_tokens(s, self._clock)
        auth = Authenticator.from_tokens(s.client_tokens, tokens)
        if not auth.enabled:
            log.warning(
                "auth_disabled",
                note="no CHARAI_API_KEYS: listening on loopback only, every caller is tenant 'default'",
            )
        tls = load_tls(s)  # bad files stop start-up before anything connects
        signer = url_signer(s)
        topology = Topology(s.namespace)

        self._nc = nc = await natsconn.connect(s.nats_url, "charai-gateway")
        stack.push_async_callback(natsconn.drain, nc)
        store = await stack.enter_async_context(
            StoreClient(
                s.task_store_addr,
                s.internal_token.get_secret_value(),
                coalesce=True,
                stream=s.exchange_stream,
            )
        )
        js = nc.jetstream()
        bucket = await natsconn.ensure_media_bucket(js, topology, s.nats_replicas)
        media = MediaStore(bucket, js, topology.media_bucket)  # bounded reads: MediaStore.get
        self.hub = hub = EventHub(nc, topology)
        stack.push_async_callback(hub.close)
        await hub.start()
        self.service = self._task_service(store, hub, signer, tokens)
        server, health = await self._grpc_server(auth, self.service, tls)
        stack.push_async_callback(server.stop, None)  # only matters when a later step fails
        await server.start()
        self.metrics.gauge_from(self.metrics.watch_streams, lambda: hub.open_streams)
        self._loopback = loopback = (
            loopback_channel(s.gateway_grpc_addr, self.grpc_port)
            if self.bridge_port == 0
            else loopback_channel("127.0.0.1:0", self.bridge_port)
        )
        stack.push_async_callback(loopback.close)
        await self._serve_http(stack, media, signer, loopback, tls)
        if metrics_addr := s.metrics_addr_of(self.process):
            endpoint = await stack.enter_async_context(MetricsEndpoint(self.metrics, metrics_addr))
            self.metrics_port = endpoint.port

        # What shutdown does first is entered last.
        stack.push_async_callback(server.stop, s.shutdown_grace_seconds)
        stack.push_async_callback(_not_serving, health)

        async def dependencies_ok() -> bool:
            return nc.is_connected and await store.serving()

        # Degraded (not down) while a provider credential's breaker is open (NATS KV watch).
        providers = await stack.enter_async_context(ProviderStates(nc, topology, s.nats_replicas))
        self.health_watcher = await stack.enter_async_context(
            HealthWatcher(
                health, [_SERVICE], dependencies_ok, clock=self._clock, degraded=providers.open_breakers
            )
        )
        stack.callback(self._end_streams)
        self._announce(tls is not None)

    def _announce(self, tls: bool) -> None:
        """The listening line supervisors wait for: ``gateway_listening`` from the only process,
        ``gateway_process_listening`` from one of several (their parent says the first)."""
        s = self.settings
        where = {
            "grpc": f"{s.gateway_grpc_addr.rpartition(':')[0]}:{self.grpc_port}",
            "http": f"{s.gateway_http_addr.rpartition(':')[0]}:{self.http_port}",
            "public_base_url": s.base_url(self.http_port),
            "tls": tls,
        }
        if self.metrics_port:
            where["metrics_port"] = self.metrics_port
        if self.process is None:
            logs.announce("gateway_listening", **where)
        else:
            logs.announce("gateway_process_listening", pid=os.getpid(), bridge_port=self.bridge_port, **where)

    def _task_service(
        self, store: StoreClient, hub: EventHub, signer: UrlSigner, tokens: AccessTokens
    ) -> TaskService:
        s = self.settings
        return TaskService(
            store,
            hub,
            signer,
            lambda: s.base_url(self.http_port),
            heartbeat_seconds=s.watch_heartbeat_seconds,
            max_streams=s.max_watch_streams,
            max_streams_per_tenant=s.max_watch_streams_per_tenant,
            models=ProviderModels.of(s),
            submit_limiter=SubmitLimiter(
                s.submit_rate_per_tenant, s.submit_burst_per_tenant, clock=self._clock.monotonic
            ),
            operator_tenants=s.operator_tenants,
            tokens=tokens,
            default_webhooks=s.default_webhooks(),
        )

    async def _grpc_server(
        self, auth: Authenticator, service: TaskService, tls: TlsFiles | None
    ) -> tuple[grpc.aio.Server, Any]:
        """The gRPC server (not started yet) with TaskService, health and reflection, bound to
        its ports; returns it and its health servicer."""
        server = grpc.aio.server(
            interceptors=[grpcsupport.ServerInterceptor(auth.grpc_check, observe=self.metrics.observe_rpc)],
            options=grpcsupport.server_options(reuse_port=self.process is not None),
        )
        add_to_server(service, server)
        health = await grpcsupport.add_health_and_reflection(server, [_SERVICE])
        self._listen_grpc(server, tls)
        return server, health

    def _listen_grpc(self, server: grpc.aio.Server, tls: TlsFiles | None) -> None:
        s = self.settings
        if tls is None:
            self.grpc_port = server.add_insecure_port(s.gateway_grpc_addr)
        else:
            self.grpc_port = server.add_secure_port(s.gateway_grpc_addr, tls.grpc_credentials())
        if tls is not None or self.process is not None:
            # gRPC-web and REST reach the servicer over loopback, in plaintext (see tls.py), on a
            # port of this process alone: through a shared public port they could reach another.
            self.bridge_port = server.add_insecure_port("127.0.0.1:0")
        if self.grpc_port == 0:
            raise SystemExit(f"gateway: cannot listen on {s.gateway_grpc_addr} (CHARAI_GATEWAY_GRPC_ADDR)")

    async def _serve_http(
        self,
        stack: contextlib.AsyncExitStack,
        media: MediaStore,
        signer: UrlSigner,
        loopback: grpc.aio.Channel,
        tls: TlsFiles | None,
    ) -> None:
        """The HTTP port: media, metrics, health, REST, gRPC-web, the console."""
        s = self.settings
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(media_routes(media, signer) + metrics_routes(self.metrics))
        app.add_routes(
            health_routes(
                # As the gRPC health says: NATS connected and task_store SERVING (probed each second).
                lambda: (
                    self._nc is not None
                    and self._nc.is_connected
                    and (self.health_watcher is None or self.health_watcher.serving)
                ),
                lambda: {"open_watch_streams": self.hub.open_streams if self.hub is not None else 0},
                lambda: self.health_watcher.degraded if self.health_watcher is not None else (),
            )
        )
        app.add_routes(RestApi(loopback).routes())
        app.add_routes(GrpcWebBridge(loopback).routes())
        app.add_routes(console_routes(s.console_dir))
        if not s.client_tokens:  # auth off: no page of another site, DNS rebinding included
            app.middlewares.insert(0, LoopbackHosts([urlsplit(s.public_base_url).netloc]).middleware)
        install_cors(app, CorsPolicy(list(s.cors_origins)))
        app.middlewares.append(json_not_found)  # innermost: sees what the router answered
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, _, port = s.gateway_http_addr.rpartition(":")
        site = web.TCPSite(
            runner,
            host,
            int(port),
            reuse_address=True,
            reuse_port=self.process is not None,
            ssl_context=tls.ssl_context() if tls is not None else None,
            # aiohttp's default queue of 128 unaccepted connections overflows in a burst of new
            # clients, and each one past it waits out a SYN retransmission (1 s).
            backlog=4096,
        )
        try:
            await site.start()
        except OSError as exc:
            raise SystemExit(
                f"gateway: cannot listen on {s.gateway_http_addr} (CHARAI_GATEWAY_HTTP_ADDR): {exc.strerror}"
            ) from None
        server_sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.http_port = int(server_sock.getsockname()[1])

    def _end_streams(self) -> None:
        """Watch streams end cleanly (clients resume elsewhere) before anything else stops."""
        if self.service is not None:
            self.service.stopping.set()
        if self.hub is not None:
            self.hub.end_all()


async def _not_serving(health: Any) -> None:
    """Health answers NOT_SERVING from now on, so probes stop sending work here."""
    with contextlib.suppress(Exception):
        await health.enter_graceful_shutdown()


async def serve(settings: Settings, process: int | None = None, ready_fd: int = -1) -> None:
    """Runs the gateway until SIGTERM: the only process, or (``process`` set) one of several,
    which tells its parent on ``ready_fd`` once it listens (:func:`processes.as_child`)."""
    app = GatewayApp(settings, process=process)
    if process is None:
        await run_until_signal(app, "gateway")
    else:
        await run_until_signal(processes.as_child(app, ready_fd), "gateway")
