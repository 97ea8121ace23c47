"""A private PostgreSQL server for the test session, and a fresh database per test.

The server is the machine's own PostgreSQL binaries (Debian's ``postgresql`` package:
``/usr/lib/postgresql/<version>/bin``), started by the tests on a free loopback port with a
temporary data directory and ``trust`` authentication, so no test depends on (or touches) a
PostgreSQL the machine may already run on 5432. Each pytest-xdist worker starts its own (the
fixture is session-scoped and xdist runs one session per worker). Every test that asks for
``postgres`` gets ``CREATE DATABASE test_<uuid>``, dropped afterwards.

Durability is switched off (``fsync=off``) and the data directory is in ``/dev/shm`` when there is
one: a crash of a test server loses nothing anyone needs, and the tests exercise locking and
ordering, not the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

SUPERUSER = "postgres"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's ``bin`` directory (Debian layout, or ``initdb`` on PATH)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    pytest.fail(
        "PostgreSQL binaries not found: install them with `apt-get install -y postgresql` "
        "(the tests start their own server; nothing needs to be running)",
        pytrace=False,
    )


def _scratch_dir() -> str | None:
    """A RAM-backed directory when the machine has one: ``CREATE DATABASE`` writes and syncs a
    few megabytes of files, which takes 0.3 to 0.7 s on a disk and 20 to 60 ms in ``/dev/shm``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free > 512 << 20:
        return str(shm)
    return None  # the default temporary directory


def _die_with_parent() -> list[str]:
    """A prefix that stops the server (SIGINT: fast shutdown) if pytest dies without cleaning
    up, so a killed test run leaves no PostgreSQL behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT"] if setpriv else []


def _remove_stale(scratch: str | None) -> None:
    """Deletes the data directories of earlier runs that died (no live postmaster, 10 min old)."""
    for base in Path(scratch or tempfile.gettempdir()).glob("charai-pg-*"):
        pid_file = base / "data" / "postmaster.pid"
        try:
            if time.time() - base.stat().st_mtime < 600:
                continue
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else 0
            if pid:
                os.kill(pid, 0)
                continue  # still running: someone else's
        except ProcessLookupError:
            pass
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(base, ignore_errors=True)


class PgServer:
    """A ``postgres`` process on a free loopback port with a temporary data directory."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: a real disk and ``fsync=on`` (for measurements); the tests use neither."""
        self.durable = durable
        self.bin = postgres_bin_dir()
        scratch = None if durable else _scratch_dir()
        _remove_stale(scratch)
        self.base = Path(tempfile.mkdtemp(prefix="charai-pg-", dir=scratch))
        self.data = self.base / "data"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # initdb and postgres refuse to run as root: run them as the postgres system user then.
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = SUPERUSER
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> list[str]:
        """A prefix that runs a command as :data:`SUPERUSER` when pytest runs as root.

        Not ``subprocess``' ``user=``: that makes Python ``fork()`` instead of ``vfork()``, and
        the child of a ``fork()`` runs gRPC's fork handlers when a test before has used gRPC in
        this process; once in a while the child died there ("Epoll1Poller … epoll_wait error:
        Bad file descriptor") and ``initdb`` never ran, failing every PostgreSQL test of that
        pytest worker. ``setpriv`` changes the user after the exec instead."""
        if self._user is None:
            return []
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise RuntimeError("setpriv (util-linux) is needed to run PostgreSQL as root")
        return [setpriv, f"--reuid={self._user}", f"--regid={self._user}", "--init-groups"]

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self._as_user(), str(self.bin / args[0]), *args[1:]],
            cwd=self.base,
            capture_output=True,
            check=False,
        )

    def start(self) -> None:
        done = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        last_error = ""
        for _ in range(5):  # the free port may be taken between choosing and binding it
            self.port = _free_port()
            log = (self.base / "postgres.log").open("ab")
            self.proc = subprocess.Popen(
                [
                    *self._as_user(),  # first: a change of user would clear the death signal
                    *_die_with_parent(),
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=200",
                    *self._speed_over_durability(),
                ],
                cwd=self.base,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready(timeout=30):
                return
            last_error = (self.base / "postgres.log").read_text(errors="replace")[-2000:]
            self._stop_process()
        raise RuntimeError(f"postgres did not start: {last_error}")

    def _speed_over_durability(self) -> list[str]:
        if self.durable:
            return []
        return ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            ready = self._run("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER)
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def _stop_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no waiting
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._stop_process()
        shutil.rmtree(self.base, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class PgDatabase:
    """One test's database on the session's server."""

    server: PgServer
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One value, on a connection of its own (for checks from outside the code under test)."""
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def count_rows(self, table: str) -> int:
        return int(await self.fetchval(f"SELECT COUNT(*) FROM {table}"))


@contextlib.asynccontextmanager
async def fresh_database(server: PgServer) -> AsyncIterator[PgDatabase]:
    """``CREATE DATABASE test_<uuid>`` on ``server``; dropped (connections and all) afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield PgDatabase(server, name)
    finally:
        admin = await asyncpg.connect(server.url())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def postgres(pg_server: PgServer) -> AsyncIterator[PgDatabase]:
    """A fresh, empty PostgreSQL database for one test."""
    async with fresh_database(pg_server) as database:
        yield database
