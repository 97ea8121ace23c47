"""Shared fixtures: a real ``nats-server -js`` on a free port with a temporary store."""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: in-process servers use the services' gRPC transport

# isort: split
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from charai.devstack.stack import nats_server_binary

from tests.pg import pg_server, postgres  # noqa: F401 - PostgreSQL fixtures for every test module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def later_port() -> int:
    """A free port for a server that starts a while after it is chosen. It lies below the kernel's
    ephemeral range (``ip_local_port_range``), where :func:`free_port`'s come from: a port there,
    freed, may be given to any outgoing connection made meanwhile (EADDRINUSE when the server
    starts); no connection is given one outside it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10_000, max(10_001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    return free_port()


class NatsServer:
    """A nats-server process with JetStream; ``restart()`` keeps its port and data."""

    def __init__(self, store_dir: Path) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-sd",
                str(self.store_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("nats-server did not start")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def nats_url(nats_server: NatsServer) -> AsyncIterator[str]:
    yield nats_server.url


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("CHARAI_LOG_LEVEL", "warning")
    # The services running inside the test process log as in production (JSON lines), not with
    # structlog's development renderer: its rich tracebacks with local variables take
    # a fraction of a second each, which stalls the shared event loop when many jobs fail at once.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        # No level filter here: structlog.testing.capture_logs (which swaps the processors only)
        # must still see every level.
        cache_logger_on_first_use=False,
    )


#: Scheduling order of the test directories: ``make test`` hands whole files to two workers in
#: collection order, so the long files (real processes, faults, browsers) go first and the many
#: short ones fill the gaps at the end, instead of one long file running alone at the tail.
_ORDER = ("faults", "e2e", "security", "integration", "unit")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        parts = item.path.parts
        for n, name in enumerate(_ORDER):
            if name in parts:
                return n
        return len(_ORDER)

    items.sort(key=rank)  # stable: within a directory, files and tests keep their order


async def eventually(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Waits until ``predicate()`` (sync or async) is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def run_cli(target: str, token: str, *args: str, columns: int = 200) -> tuple[int, str, str]:
    """The ``charai`` CLI as a real subprocess against the gateway at ``target`` (no other
    CHARAI_* setting of this environment leaks in): exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(CHARAI_TARGET=target, CHARAI_TOKEN=token, COLUMNS=str(columns))
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "charai"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None, err
    return process.returncode, out.decode(), err.decode()
