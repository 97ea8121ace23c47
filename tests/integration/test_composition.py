"""The composition roots (GatewayApp, TaskStoreApp, WorkerApp) against a real nats-server: a
start that fails half-way closes exactly what it opened, and close() is idempotent.

Each start is made to fail at its last step (a taken port), so every part before it was opened
and must be closed again: NATS connections, gRPC servers, the outbox relay, the database, the
job runner, HTTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.image_worker.app import build as build_image_worker
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings as StoreSettings
from charai.worker.settings import ImageWorkerSettings

from tests.conftest import NatsServer


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def store_settings(nats: NatsServer, tmp_path: Path, **extra: object) -> StoreSettings:
    return StoreSettings(
        nats_url=nats.url,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'tasks.db'}",
        shutdown_grace_seconds=1.0,
        **extra,  # type: ignore[arg-type]
    )


def gateway_settings(nats: NatsServer, tmp_path: Path, store_port: int) -> GatewaySettings:
    """A gateway on free ports in front of the task_store on ``store_port``."""
    return GatewaySettings(
        nats_url=nats.url,
        data_dir=tmp_path,
        task_store_addr=f"127.0.0.1:{store_port}",
        gateway_grpc_addr="127.0.0.1:0",
        gateway_http_addr="127.0.0.1:0",
        shutdown_grace_seconds=1.0,
    )


async def test_gateway_start_failing_at_its_http_port_closes_what_it_opened(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with taken_port() as port:
        settings = GatewaySettings(
            nats_url=nats_server.url,
            data_dir=tmp_path,
            gateway_grpc_addr="127.0.0.1:0",
            gateway_http_addr=f"127.0.0.1:{port}",
            shutdown_grace_seconds=1.0,
        )
        app = GatewayApp(settings)
        with pytest.raises(SystemExit, match="CHARAI_GATEWAY_HTTP_ADDR"):
            await app.start()
    assert app.grpc_port > 0, "the gRPC server was started before the HTTP port failed"
    assert not await listening(app.grpc_port)
    assert app._nc is not None and app._nc.is_closed
    assert app.hub is not None and app.hub._sub is None
    await app.close()  # again: nothing left to do


async def test_task_store_start_failing_at_its_metrics_port_closes_what_it_opened(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with taken_port() as port:
        app = TaskStoreApp(
            store_settings(nats_server, tmp_path, metrics_addr=f"127.0.0.1:{port}"), "127.0.0.1:0"
        )
        with pytest.raises(SystemExit, match="CHARAI_METRICS_ADDR"):
            await app.start()
    assert app.port > 0 and not await listening(app.port)
    assert app._nc is not None and app._nc.is_closed
    assert app.relay is not None and app.relay._tasks == []
    assert app.store is not None and app.store.backend._closed  # type: ignore[attr-defined]
    await app.close()
    # The same data dir and NATS serve a new start at once: nothing was left holding them.
    async with TaskStoreApp(store_settings(nats_server, tmp_path), "127.0.0.1:0") as again:
        assert await listening(again.port)


async def test_worker_start_failing_at_its_metrics_port_closes_what_it_opened(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with TaskStoreApp(store_settings(nats_server, tmp_path), "127.0.0.1:0") as store:
        with taken_port() as port:
            settings = ImageWorkerSettings(
                nats_url=nats_server.url,
                data_dir=tmp_path,
                task_store_addr=f"127.0.0.1:{store.port}",
                metrics_addr=f"127.0.0.1:{port}",
                shutdown_grace_seconds=1.0,
            )
            app = build_image_worker(settings)
            with pytest.raises(SystemExit, match="CHARAI_METRICS_ADDR"):
                await app.start()
        # The metrics port is taken before the runner starts: it never took a job or a lane.
        assert app.runner is not None and not app.runner._lanes and not app.runner._tasks
        assert app._session is not None and app._session.closed
        assert app._store is not None and app._store._closed
        assert app._nc is not None and app._nc.is_closed
        await app.close()


async def test_close_is_idempotent_and_announces_once(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with TaskStoreApp(store_settings(nats_server, tmp_path), "127.0.0.1:0") as store:
        gateway = GatewayApp(gateway_settings(nats_server, tmp_path, store.port))
        async with gateway:
            assert await listening(gateway.grpc_port) and await listening(gateway.http_port)
        await asyncio.gather(gateway.close(), gateway.close())
        assert not await listening(gateway.grpc_port) and not await listening(gateway.http_port)
        await store.close()
        await store.close()
        assert not await listening(store.port)
    out = capsys.readouterr().out
    assert out.count("gateway_stopped") == 1 and out.count("task_store_stopped") == 1
