"""The gateway as several processes on one pair of ports (``CHARAI_GATEWAY_PROCESSES`` > 1).

Why: one Python process runs its event loop on one core, and the gateway's work per call
(protobuf, the interceptor, the log line, HTTP/2 framing) is CPU. N processes bind the same gRPC
and HTTP ports with SO_REUSEPORT and the kernel spreads new connections over them (per
connection: a client on one channel stays on one process). Each process is a whole gateway with
its own NATS subscription, so its own event fan-out: a watcher on one sees what was done
through another, as with replicas behind a load balancer.

The parent serves nothing. It reserves both ports (a socket bound with SO_REUSEPORT that never
listens: port 0 becomes one concrete port every process binds, and no other program takes the
port while a process restarts), creates the generated signing keys (so processes starting
together cannot race to create two), then starts ``python -m charai.gateway --process I`` I = 0..N-1
(fresh interpreters: gRPC does not survive a fork once initialized). It says
``gateway_listening`` once every process listens, restarts a process that dies (the backoff of
:mod:`charai.core.restarts`; the others keep the ports served meanwhile), and gives up (stops
them all, exit 1) only when one keeps crashing before it ever listens: restarting the whole
gateway would end every watch stream to fix one process. SIGTERM/SIGINT to the parent drains
every process (each as a single gateway does), then it exits 0.

Between parent and process: ``--ready-fd`` is a pipe the process writes :data:`READY` to once it
listens; its stdin is a pipe from the parent that nobody writes, whose end of file (the parent
died, even by ``kill -9``) makes the process drain as on SIGTERM. Stdout and stderr are shared;
every line of a process carries ``gateway_process`` (its index).

Metrics: each process has its own registry. ``/metrics`` on the shared HTTP port answers with the
registry of whichever process took the connection; scrape ``CHARAI_METRICS_ADDR`` instead, where
process I serves on the port plus I (:meth:`Settings.metrics_addr_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import structlog
from charai.core import logs
from charai.core.clock import SYSTEM, Clock
from charai.core.restarts import RestartPolicy, RestartTracker
from charai.gateway.settings import Settings
from charai.gateway.signing import access_tokens, media_signingkeys

log = structlog.get_logger("gateway")
T = TypeVar("T")
#: What a process writes on its ready pipe once it listens.
READY = b"ready\n"
#: How much longer than its drain a process is given before it is killed.
KILL_AFTER_GRACE_S = 5.0


# -- the process side --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def as_child(component: AbstractAsyncContextManager[T], ready_fd: int) -> AsyncIterator[T]:
    """``component`` entered, then the parent told it listens (on ``ready_fd``) and watched: when
    the parent goes away, this process drains as on SIGTERM."""
    async with component as entered:
        _follow_parent()
        with contextlib.suppress(OSError):  # the parent is gone: the lifeline says so next
            os.write(ready_fd, READY)
        with contextlib.suppress(OSError):
            os.close(ready_fd)
        yield entered


def _follow_parent() -> None:
    """stdin is the parent's lifeline, never written: readable means end of file, the parent is
    gone. The process then signals itself, so it drains on the one SIGTERM path."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        with contextlib.suppress(OSError):
            if os.read(fd, 4096):
                return  # nobody writes here; ignore it rather than stop
        loop.remove_reader(fd)
        log.warning("gateway_parent_gone")
        os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(fd, readable)


# -- the parent side ---------------------------------------------------------------------------
def reserve(addr: str, setting: str) -> tuple[socket.socket, str]:
    """A socket bound to ``addr`` with SO_REUSEPORT that never listens, and the address with its
    concrete port. It gets no connections (only listening sockets do) and keeps the port ours."""
    host, _, port = addr.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SystemExit(f"gateway: cannot listen on {addr} ({setting}): {exc}") from None
    try:
        # SO_REUSEADDR as grpc and aiohttp set it: a restart is not refused for TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"gateway: cannot listen on {addr} ({setting}): {exc.strerror}") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


@dataclasses.dataclass
class _Child:
    """One running gateway process: its index, the process and the read end of its ready pipe."""

    index: int
    process: asyncio.subprocess.Process
    ready: asyncio.StreamReader
    ready_pipe: asyncio.BaseTransport

    def close_pipes(self) -> None:
        self.ready_pipe.close()
        if self.process.stdin is not None:
            self.process.stdin.close()  # the lifeline: end of file drains the process


class GaveUpError(Exception):
    """A process kept crashing before it ever listened; the message names it and why."""


class ProcessGroup:
    """The parent of the gateway's processes (see the module doc). ``await run()`` returns the
    exit code: 0 after a drain on SIGTERM/SIGINT; a process's own code when it failed at first
    start (2 for a bad setting); 1 when one kept crashing at start later."""

    def __init__(
        self, settings: Settings, *, policy: RestartPolicy | None = None, clock: Clock = SYSTEM
    ) -> None:
        self.settings = settings
        self.count = settings.gateway_processes
        self.children: dict[int, _Child] = {}
        self._trackers = {i: RestartTracker(policy or RestartPolicy()) for i in range(self.count)}
        self._clock = clock
        self._reserved: list[socket.socket] = []
        self._env: dict[str, str] = {}

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            self._prepare()
            code = await self._start_all(stop)
            if code is None:
                self._announce()
                code = await self._supervise(stop)
            return code
        finally:
            await self._stop_all()
            for sock in self._reserved:
                sock.close()
            logs.announce("gateway_stopped", processes=self.count)

    def _prepare(self) -> None:
        """Reserves both ports and creates the generated keys before any process starts."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise SystemExit("gateway: CHARAI_GATEWAY_PROCESSES > 1 needs SO_REUSEPORT (Linux)")
        s = self.settings
        env = dict(os.environ)
        for name, addr in (
            ("CHARAI_GATEWAY_GRPC_ADDR", s.gateway_grpc_addr),
            ("CHARAI_GATEWAY_HTTP_ADDR", s.gateway_http_addr),
        ):
            sock, env[name] = reserve(addr, name)
            self._reserved.append(sock)
        self._env = env
        media_signingkeys(s)
        access_tokens(s)

    async def _spawn(self, index: int) -> _Child:
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "charai.gateway"),
                *("--process", str(index), "--ready-fd", str(write_fd)),
                stdin=asyncio.subprocess.PIPE,
                env=self._env,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader()
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        self._trackers[index].started()
        child = self.children[index] = _Child(index, process, reader, pipe)
        return child

    async def _ready(self, child: _Child) -> bool:
        """Whether ``child`` came to listen (False: it exited first)."""
        listening = await child.ready.readline() == READY
        child.ready_pipe.close()
        if listening:
            self._trackers[child.index].ready(self._clock.monotonic())
        return listening

    async def _start_all(self, stop: asyncio.Event) -> int | None:
        """Every process, until each listens (None), one exits first (its exit code, at least 1)
        or ``stop`` is set (0)."""
        children = [await self._spawn(i) for i in range(self.count)]
        waits = {asyncio.create_task(self._ready(child)): child for child in children}
        stopping = asyncio.create_task(stop.wait())
        pending: set[asyncio.Task[bool]] = set(waits)
        try:
            while pending:
                done, _ = await asyncio.wait({*pending, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return 0
                for task in done:
                    pending.discard(task)  # type: ignore[arg-type]
                    child = waits[task]  # type: ignore[index]
                    if not task.result():
                        code = await child.process.wait()
                        log.error("gateway_process_failed_to_start", process=child.index, exit_code=code)
                        return code if code > 0 else 1
            return None
        finally:
            for task in [*pending, stopping]:
                task.cancel()
            await asyncio.gather(*pending, stopping, return_exceptions=True)

    def _announce(self) -> None:
        s = self.settings
        grpc_addr, http_addr = self._env["CHARAI_GATEWAY_GRPC_ADDR"], self._env["CHARAI_GATEWAY_HTTP_ADDR"]
        logs.announce(
            "gateway_listening",
            grpc=grpc_addr,
            http=http_addr,
            public_base_url=s.base_url(int(http_addr.rpartition(":")[2])),
            tls=s.tls,
            processes=self.count,
            pids=[self.children[i].process.pid for i in range(self.count)],
        )

    async def _supervise(self, stop: asyncio.Event) -> int:
        """Keeps every process running until ``stop`` (0) or one keeps crashing at start (1)."""
        keepers = [asyncio.create_task(self._keep(i), name=f"gateway-process-{i}") for i in range(self.count)]
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *keepers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *keepers]:
                task.cancel()
            results = await asyncio.gather(stopping, *keepers, return_exceptions=True)
        if stopping in done:
            log.info("gateway_draining", processes=self.count)
            return 0
        failure = next(r for r in results[1:] if isinstance(r, BaseException))
        log.error("gateway_processes_gave_up", error=str(failure))
        return 1

    async def _keep(self, index: int) -> None:
        """Restarts process ``index`` each time it dies; raises :class:`GaveUpError` when it keeps
        crashing before it listens."""
        tracker = self._trackers[index]
        while True:
            child = self.children[index]
            code = await child.process.wait()
            child.close_pipes()
            verdict = tracker.crashed(self._clock.monotonic())
            why = _exit_reason(code)
            pid = child.process.pid
            log.warning("gateway_process_died", process=index, pid=pid, exit=why, restart_in=verdict.delay)
            if verdict.give_up:
                raise GaveUpError(
                    f"gateway process {index} keeps crashing at start "
                    f"({verdict.start_crashes} times in a row, never listening); last: {why}"
                )
            await self._clock.sleep(verdict.delay)
            await self._ready(await self._spawn(index))

    async def _stop_all(self) -> None:
        """SIGTERM to every process, then each gets its drain time and a little more."""
        live = [c for c in self.children.values() if c.process.returncode is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        limit = self.settings.shutdown_grace_seconds + KILL_AFTER_GRACE_S
        await asyncio.gather(*(_reap(child, limit) for child in live))
        for child in self.children.values():
            child.close_pipes()


async def _reap(child: _Child, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            await child.process.wait()
    except TimeoutError:
        log.warning("gateway_process_killed", process=child.index, pid=child.process.pid, after_s=limit)
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
        await child.process.wait()


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
