"""Helpers shared by every shape: statistics, /proc sampling, machine facts, Redis, subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NODE_DIR = BENCH_DIR / "node"
CELERY_VENV = BENCH_DIR / ".venv-celery"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))])


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max over runs of every numeric metric."""
    skip = {"run", "worker_pid", "first_start", "last_end", "first_submit"}
    keys: list[str] = []
    for run in runs:
        keys += [
            k
            for k, v in run.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in keys and k not in skip
        ]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(r[key]) for r in runs if isinstance(r.get(key), int | float)]
        values = [v for v in values if not math.isnan(v)]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


# -- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    """Resident set size of one process, KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE // 1024
    except (OSError, ValueError, IndexError):
        return 0


def tree_pids(pid: int) -> list[int]:
    """The process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of one process spent runnable but not running (waiting for a core:
    ``/proc/<pid>/task/*/schedstat``, second field), since they started; 0 if it is gone.

    Over a run, it says how contended the machine was: a latency that grows while this grows
    too is the processes waiting for the cores, not for each other."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def cpu_of(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


class RssSampler:
    """Samples the RSS of some processes every ``interval`` seconds in the background."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int]:
        return {name: sum(rss_kb(p) for p in group) for name, group in self.pids.items()}

    async def _run(self) -> None:
        t0 = time.perf_counter()
        while True:
            self.samples.append((time.perf_counter() - t0, self.sample()))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, self.sample()))

    def peak(self, name: str) -> int:
        return max((s[name] for _, s in self.samples), default=0)

    def series(self, name: str) -> list[int]:
        return [s[name] for _, s in self.samples]


@contextlib.asynccontextmanager
async def child(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    name: str = "",
    ready: str | None = None,
    timeout: float = 60.0,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Runs a child process for the duration of the block; ``ready``: wait for a line containing it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=full_env,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,
    )
    lines: list[str] = []
    seen = asyncio.Event()

    async def pump() -> None:
        assert proc.stdout is not None
        while raw := await proc.stdout.readline():
            text = raw.decode(errors="replace").rstrip()
            lines.append(text)
            if ready is not None and ready in text:
                seen.set()
            if os.environ.get("CHARAI_BENCH_ECHO"):
                print(f"[{name:>10}] {text}", file=sys.stderr, flush=True)

    reader = asyncio.create_task(pump())
    try:
        if ready is not None:
            waiter = asyncio.create_task(seen.wait())
            done, _ = await asyncio.wait(
                {waiter, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                waiter.cancel()
                tail = "\n".join(lines[-30:])
                raise RuntimeError(f"{name or args[0]} did not print {ready!r}:\n{tail}")
        yield proc, lines
    finally:
        await stop_process(proc)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await reader
        reader.cancel()


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """SIGTERM the process group we started (start_new_session), then SIGKILL after ``timeout``."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# -- Redis --------------------------------------------------------------------------------------
def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server not found: run 'python -m bench setup' (apt-get install redis-server)"
        )
    return found


@dataclasses.dataclass
class RedisServer:
    url: str
    pid: int
    durable: bool


@contextlib.asynccontextmanager
async def redis_server(durable: bool) -> AsyncIterator[RedisServer]:
    """redis-server on a free loopback port: no persistence, or AOF with ``appendfsync always``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        async with child(args, name="redis", ready="Ready to accept connections") as (proc, _):
            yield RedisServer(f"redis://127.0.0.1:{port}/0", proc.pid, durable)


# -- machine and versions -----------------------------------------------------------------------
def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=30, cwd=cwd, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


#: The loop :func:`core_speed` times: one core's speed for pure Python, the work most of the
#: stack does. (The analyses before it timed the same loop with the system's ``python3``, a
#: slower build: 0.52 s against this venv's 0.39 s on one VM at one time.)
CORE_LOOP = "s = 0\nfor i in range(10**7):\n    s += i"


def core_speed(rounds: int = 3) -> float:
    """Seconds one core takes for :data:`CORE_LOOP`, the best of ``rounds``: measured at the
    start and the end of a run, it says how fast this VM was while the run went (a cloud VM's
    speed changes from one hour to the next, and every ratio to a peer moves with it less than
    the absolute figures do)."""
    code = compile(CORE_LOOP, "<core_speed>", "exec")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        exec(code, {})  # noqa: S102 - a constant loop of our own
        best = min(best, time.perf_counter() - t0)
    return best


def commit() -> str:
    """The commit measured, and how: the work tree, or a snapshot put first on PYTHONPATH."""
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT)
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT))
    where = (
        "snapshot on PYTHONPATH"
        if os.environ.get("PYTHONPATH")
        else ("work tree, modified" if dirty else "work tree")
    )
    return f"{head} ({where})"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    # The interpreter's build matters as much as its version (pure Python ran about 20 % faster
    # on a PGO build than on a plain one here): where it comes from, for every Python system.
    interpreter = os.path.realpath(sys._base_executable)
    out: dict[str, str] = {"python": f"{platform.python_version()} ({interpreter})"}
    for pkg in ("grpcio", "protobuf", "nats-py", "aiohttp"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    from charai.devstack.stack import nats_server_binary

    out["nats-server"] = _run([nats_server_binary(), "--version"]).removeprefix("nats-server: ")
    with contextlib.suppress(RuntimeError):
        m = re.search(r"v=(\S+)", _run([redis_binary(), "--version"]))
        out["redis-server"] = m.group(1) if m else ""
    node = shutil.which("node")
    if node:
        out["node"] = _run([node, "--version"])
    for pkg in ("bullmq", "ioredis"):
        with contextlib.suppress(OSError, ValueError):
            out[pkg] = json.loads((NODE_DIR / "node_modules" / pkg / "package.json").read_text())["version"]
    py = CELERY_VENV / "bin" / "python"
    if py.exists():
        text = _run(
            [
                str(py),
                "-c",
                "import importlib.metadata as m, json;"
                "print(json.dumps({p: m.version(p) for p in ('celery', 'kombu', 'redis', 'gevent')}))",
            ]
        )
        with contextlib.suppress(ValueError):
            out.update(json.loads(text))
    return out


@contextlib.asynccontextmanager
async def emulator(lo: float, hi: float, seed: int, max_concurrency: int | None = None) -> AsyncIterator[str]:
    """A standalone provider emulator (for peers and floors); yields its base URL."""
    args = [sys.executable, "-m", "charai.emulator", "--host", "127.0.0.1", "--port", "0"]
    args += ["--latency", f"{lo}:{hi}", "--seed", str(seed), "--log-level", "WARNING"]
    if max_concurrency:
        args += ["--max-concurrency", str(max_concurrency)]
    async with child(args, name="emulator", ready="emulator_listening") as (_, lines):
        line = next(json.loads(x) for x in lines if "emulator_listening" in x)
        yield str(line["url"])
