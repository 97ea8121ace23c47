"""``python -m bench profile --shape B2|B2noop|B3|B4|B4b|B1|B5|W1``: py-spy on every Python service of
the stack while the shape's load runs (``B2noop``: B2's load on the no-op worker; ``B3``: B3's at
1,000 jobs in flight, the emulator profiled too; ``W1``: W1's drain, the webhook sender, task_store
and the receiver's process); prints where each process spends its CPU (self and inclusive time).

py-spy is installed into bench/.venv-tools (never into the project venv). Raw collapsed stacks
and the summary go to bench/results/profile-<shape>-<time>/.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_service_pb2

from bench import ours
from bench.common import BENCH_DIR, cpu_seconds, log

TOOLS = BENCH_DIR / ".venv-tools"
PY_SPY = TOOLS / "bin" / "py-spy"
SERVICES = ("task_store", "gateway", "tts_worker")


def ensure_py_spy() -> Path:
    if not PY_SPY.exists():
        log("installing py-spy into bench/.venv-tools")
        subprocess.run(["python3", "-m", "venv", str(TOOLS)], check=True)
        subprocess.run(
            [str(TOOLS / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "py-spy"], check=True
        )
    return PY_SPY


class Spies:
    def __init__(self, pids: dict[str, int], out: Path, rate: int = 200) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, Path] = {}
        self._out, self._rate = out, rate
        for name, pid in pids.items():
            self.add(name, pid)

    def add(self, name: str, pid: int) -> None:
        self.files[name] = self._out / f"{name}.txt"
        args = [str(PY_SPY), "record", "-p", str(pid), "-r", str(self._rate), "--nonblocking", "-f", "raw"]
        args += ["-o", str(self.files[name])]
        self.procs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def summarize(path: Path, top: int = 20) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{path.stem}: {total} samples", "  self:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    lines += ["  inclusive:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top + 15)]
    return "\n".join(lines)


async def _profile_b5(out: Path, streams: int) -> Spies:
    """B5 (``streams`` watchers, one task per 10 of them, 50 reports each at 20 Hz) with
    task_store and the gateway under py-spy."""
    async with (
        ours.stack(env=ours.B5_ENV, services=("task_store", "gateway")) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        channels = [grpc.aio.insecure_channel(s.gateway_grpc) for _ in range(max(1, streams // 100))]
        store = ours.worker_store(s)
        stub = store
        try:
            await ours._b5_once(s, client, channels, stub, "b5-warm", 100, 10, 50, 20.0)
            spies = Spies({k: ours.pid(s, k) for k in ("task_store", "gateway")}, out)
            await asyncio.sleep(1)
            tasks = max(1, streams // 10)
            res = await ours._b5_once(s, client, channels, stub, "b5-prof", streams, tasks, 50, 20.0)
            spies.stop()
            lag, report = res["lag_ms_p99"], res["report_rpc_ms_p50"]
            log(f"B5 under py-spy: lag p99 {lag:.0f} ms, report p50 {report:.1f} ms")
        finally:
            for ch in channels:
                await ch.close()
            await store.close()
    return spies


async def _profile_b2(s: Stack, client: CharaiClient, out: Path, n: int) -> Spies:
    """B2's load (``n`` tasks, 64 creates in flight) with the services under py-spy."""
    await ours._b2_e2e(s, client, "b2-warm", 500, 64)
    spies = Spies({k: ours.pid(s, k) for k in SERVICES}, out)
    await asyncio.sleep(1)
    res = await ours._b2_e2e(s, client, "b2-prof", n, 64)
    spies.stop()
    log(f"B2 under py-spy: {res['tasks_per_s']:.0f} tasks/s")
    return spies


async def _profile_b3(out: Path, n: int) -> Spies:
    """B3's load at ``n`` jobs in flight: ``n`` TTS tasks (100 CreateTask calls in flight), one
    worker of concurrency ``n``, the emulator answering each call after a seeded 1 to 2 s; after
    a warm-up of 200 tasks, one run under py-spy with the emulator profiled too (it shares the
    cores). Logs the run's efficiency and each process's CPU per task (from /proc)."""
    draws = ours.Draws(7, 1.0, 2.0)
    env, latency = {"CHARAI_TTS_CONCURRENCY": str(n)}, ["--latency", "1:2", "--seed", "7"]
    async with (
        ours.stack(env=env, emulator_args=latency) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        await ours._b3_once(s, client, draws, "b3-warm", 200, n)
        spies = Spies({k: ours.pid(s, k) for k in (*SERVICES, "emulator")}, out)
        await asyncio.sleep(1)
        before = ours._cpu(s)
        res = await ours._b3_once(s, client, draws, "b3-prof", n, n)
        cpu = ours._cpu_delta(before, ours._cpu(s), n)
        spies.stop()
    total = cpu.pop("cpu_ms_per_task")
    per = ", ".join(f"{k.removeprefix('cpu_ms_per_task_')} {v:.2f}" for k, v in cpu.items())
    log(
        f"B3 under py-spy: efficiency {res['efficiency']:.3f}, creates {res['submit_s']:.2f} s of a"
        f" {res['makespan_s']:.2f} s makespan; CPU-ms per task {total:.2f} ({per})"
    )
    return spies


async def _profile_w1(out: Path, n: int) -> Spies:
    """W1's drain: ``n`` completed tasks' deliveries waiting, then the webhook sender started with
    it, task_store and this process (the receiver) under py-spy. Logs the deliveries per second
    and each process's CPU per delivery (from /proc)."""
    from bench import webhooks

    async with (
        webhooks.Receiver() as receiver,
        ours.stack(env=webhooks.ENV, services=webhooks.SERVICES) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        await webhooks._w1_once(s, client, receiver, min(n, 500), 0, 100.0)
        receiver.arrivals.clear()
        await s.stop_service("webhook_sender")
        await webhooks._submit(client, "w1-prof", n, receiver.url, None)
        await ours.wait_finished(client, "w1-prof", timeout=600)
        await s.start_service("webhook_sender")
        await s.wait_ready("webhook_sender")
        watched = {k: ours.pid(s, k) for k in ("webhook_sender", "task_store", "nats")}
        spies = Spies({"webhook_sender": watched["webhook_sender"], "task_store": watched["task_store"]}, out)
        spies.add("receiver", os.getpid())
        before = {k: cpu_seconds(p) for k, p in watched.items()} | {"receiver": time.process_time()}
        started = time.time()
        await webhooks._until(lambda: len(receiver.arrivals) >= n, timeout=900)
        elapsed = time.time() - started
        after = {k: cpu_seconds(p) for k, p in watched.items()} | {"receiver": time.process_time()}
        spies.stop()
    per = ", ".join(f"{k} {(after[k] - v) * 1e6 / n:.0f}" for k, v in before.items())
    log(f"W1 under py-spy: {n / elapsed:.0f} deliveries/s; CPU-us per delivery: {per}")
    return spies


async def profile(shape: str, n: int, seconds: float) -> Path:
    ensure_py_spy()
    out = BENCH_DIR / "results" / f"profile-{shape}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    if shape in ("B4", "B4b"):
        from bench.load import unary_load

        async with ours.stack(services=("task_store", "gateway")) as s:
            one = ours.tts_request("b4-prof", "submit capacity")
            request = one.SerializeToString()
            method = "/charai.tasks.v1.TaskService/CreateTask"
            if shape == "B4b":
                request = task_service_pb2.BatchCreateTasksRequest(requests=[one] * 4).SerializeToString()
                method = "/charai.tasks.v1.TaskService/BatchCreateTasks"
            await unary_load(s.gateway_grpc, method, request, 100, 3)
            spies = Spies({k: ours.pid(s, k) for k in ("task_store", "gateway")}, out)
            await asyncio.sleep(1)
            res = await unary_load(s.gateway_grpc, method, request, 100, seconds)
            spies.stop()
            log(f"{shape} under py-spy: {res['rps']:.0f} calls/s")
    elif shape == "B5":
        spies = await _profile_b5(out, n)
    elif shape == "W1":
        spies = await _profile_w1(out, n)
    elif shape == "B3":
        spies = await _profile_b3(out, n)
    elif shape == "B2noop":
        async with ours.noop_stack() as s, CharaiClient(s.gateway_grpc) as client:
            spies = await _profile_b2(s, client, out, n)
    else:
        async with ours.stack() as s, CharaiClient(s.gateway_grpc) as client:
            if shape == "B1":
                await ours._b1_once(client, "b1-warm", 30, 0.01)
                res = await ours._b1_once(client, "b1-idle", 100, 0.05)
                timeline = {k: round(v, 2) for k, v in res.items() if k.endswith("_ms_p50")}
                log(f"B1 at 20/s: p50 {res['started_at_client_ms_p50']:.2f} ms; hops (p50): {timeline}")
                (out / "hops.txt").write_text(f"{res}\n")
                spies = Spies({k: ours.pid(s, k) for k in SERVICES}, out)
                await asyncio.sleep(1)
                res = await ours._b1_once(client, "b1-prof", n, 0.01)
                log(f"B1 under py-spy: p50 {res['started_at_client_ms_p50']:.2f} ms")
                spies.stop()
            else:
                spies = await _profile_b2(s, client, out, n)
    text = "\n\n".join(summarize(f) for f in spies.files.values() if f.exists() and f.stat().st_size)
    (out / "summary.txt").write_text(text)
    print(text)
    return out
