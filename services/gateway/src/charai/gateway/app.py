"""Composition root of the gateway: gRPC port, HTTP port, event hub, task_store client."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from charai.core import grpcsupport, logs, natsconn
from charai.core.lifecycle import run_until_signal
from charai.core.media import MediaStore, UrlSigner
from charai.core.metrics import Metrics
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.gateway.auth import Authenticator
from charai.gateway.events import EventHub
from charai.gateway.grpcweb import GrpcWebBridge, loopback_channel
from charai.gateway.http import CorsPolicy, console_routes, health_routes, install_cors, media_routes
from charai.gateway.limits import SubmitLimiter
from charai.gateway.ops import HealthWatcher, metrics_routes
from charai.gateway.rest import RestApi
from charai.gateway.service import TaskService, add_to_server
from charai.gateway.settings import Settings
from charai.gateway.tls import TlsFiles
from charai.tasks.v1 import task_service_pb2
from nats.aio.client import Client

log = structlog.get_logger("gateway")


def signing_key(settings: Settings) -> bytes:
    """The media URL signing secret: the setting, or one kept in the data dir (so URLs survive a
    restart of ``make run``)."""
    if configured := settings.media_signing_key.get_secret_value():
        return configured.encode()
    path = Path(settings.data_dir) / "media-signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip().encode()


async def _false() -> bool:
    return False


class GatewayApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_port = 0
        self.http_port = 0
        #: The plaintext loopback-only gRPC port the HTTP bridge uses when the public one is TLS.
        self.bridge_port = 0
        self.service: TaskService | None = None
        self.hub: EventHub | None = None
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._store: StoreClient | None = None
        self._nc: Client | None = None
        self._health = None
        #: gRPC-web and REST reach the servicer through the gateway's own gRPC port.
        self._loopback: grpc.aio.Channel | None = None
        self._closed = False
        #: This process's Prometheus metrics (``GET /metrics`` on the HTTP port).
        self.metrics = Metrics("gateway")
        self.health_watcher: HealthWatcher | None = None

    async def start(self) -> None:
        s = self.settings
        auth = Authenticator.from_tokens(
            s.client_tokens
        )  # a public address without tokens: settings refuse it
        if not auth.enabled:
            log.warning(
                "auth_disabled",
                note="no CHARAI_API_KEYS: listening on loopback only, every caller is tenant 'default'",
            )
        tls = TlsFiles.load(s.tls_cert_file, s.tls_key_file) if s.tls_cert_file and s.tls_key_file else None
        topology = Topology(s.namespace)
        self._nc = await natsconn.connect(s.nats_url, "charai-gateway")
        js = self._nc.jetstream()
        bucket = await natsconn.ensure_media_bucket(js, topology, s.nats_replicas)
        media = MediaStore(bucket)
        self.hub = EventHub(self._nc, topology)
        await self.hub.start()
        self._store = StoreClient(s.task_store_addr, s.internal_token.get_secret_value())
        signer = UrlSigner(signing_key(s), s.media_url_ttl_seconds)
        self.service = TaskService(
            self._store,
            self.hub,
            signer,
            lambda: s.base_url(self.http_port),
            heartbeat_seconds=s.watch_heartbeat_seconds,
            max_streams=s.max_watch_streams,
            max_streams_per_tenant=s.max_watch_streams_per_tenant,
            image_model=s.image_model,
            submit_limiter=SubmitLimiter(s.submit_rate_per_tenant, s.submit_burst_per_tenant),
            operator_tenants=s.operator_tenants,
        )
        server = grpc.aio.server(
            interceptors=[grpcsupport.ServerInterceptor(auth.grpc_check, observe=self.metrics.observe_rpc)],
            options=grpcsupport.SERVER_OPTIONS,
        )
        add_to_server(self.service, server)
        self._health = await grpcsupport.add_health_and_reflection(
            server, [task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name]
        )
        if tls is None:
            self.grpc_port = server.add_insecure_port(s.gateway_grpc_addr)
        else:
            self.grpc_port = server.add_secure_port(s.gateway_grpc_addr, tls.grpc_credentials())
            # gRPC-web and REST reach the servicer over loopback, in plaintext (see tls.py).
            self.bridge_port = server.add_insecure_port("127.0.0.1:0")
        if self.grpc_port == 0:
            raise SystemExit(f"gateway: cannot listen on {s.gateway_grpc_addr} (CHARAI_GATEWAY_GRPC_ADDR)")
        await server.start()
        self._server = server
        self._start_ops()

        app = web.Application(client_max_size=1024 * 1024)
        app.add_routes(media_routes(media, signer) + metrics_routes(self.metrics))
        app.add_routes(
            health_routes(
                lambda: self._nc is not None and self._nc.is_connected,
                lambda: {"open_watch_streams": self.hub.open_streams if self.hub is not None else 0},
            )
        )
        self._loopback = (
            loopback_channel(s.gateway_grpc_addr, self.grpc_port)
            if tls is None
            else loopback_channel("127.0.0.1:0", self.bridge_port)
        )
        app.add_routes(RestApi(self._loopback).routes())
        app.add_routes(GrpcWebBridge(self._loopback).routes())
        app.add_routes(console_routes(s.console_dir))
        install_cors(app, CorsPolicy(list(s.cors_origins)))
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        host, _, port = s.gateway_http_addr.rpartition(":")
        site = web.TCPSite(
            self._runner,
            host,
            int(port),
            reuse_address=True,
            ssl_context=tls.ssl_context() if tls is not None else None,
        )
        try:
            await site.start()
        except OSError as exc:
            raise SystemExit(
                f"gateway: cannot listen on {s.gateway_http_addr} (CHARAI_GATEWAY_HTTP_ADDR): {exc.strerror}"
            ) from None
        server_sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.http_port = int(server_sock.getsockname()[1])
        grpc_host = s.gateway_grpc_addr.rpartition(":")[0]
        logs.announce(
            "gateway_listening",
            grpc=f"{grpc_host}:{self.grpc_port}",
            http=f"{host}:{self.http_port}",
            public_base_url=s.base_url(self.http_port),
            tls=tls is not None,
        )

    def _start_ops(self) -> None:
        """The open-streams gauge, and the watcher that reports NOT_SERVING while NATS or
        task_store is out of reach."""
        hub, store, nc = self.hub, self._store, self._nc
        assert hub is not None and store is not None and nc is not None
        self.metrics.gauge_from(self.metrics.watch_streams, lambda: hub.open_streams)
        self.health_watcher = HealthWatcher(
            self._health,
            [task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name],
            lambda: store.serving() if nc.is_connected else _false(),
        )
        self.health_watcher.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.service is not None:
            self.service.stopping.set()  # watch streams end cleanly; clients resume elsewhere
            if self.hub is not None:
                self.hub.end_all()
        if self.health_watcher is not None:
            await self.health_watcher.close()
        if self._health is not None:
            with contextlib.suppress(Exception):
                await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_seconds)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._loopback is not None:
            await self._loopback.close()
        if self.hub is not None:
            await self.hub.close()
        if self._store is not None:
            await self._store.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        logs.announce("gateway_stopped")

    async def __aenter__(self) -> GatewayApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(settings: Settings) -> None:
    await run_until_signal(GatewayApp(settings), "gateway")
