"""Drives the Celery peer: starts a worker, runs a shape, prints one JSON line per measured run.

``python driver.py '<json options>'`` from bench/.venv-celery, with BENCH_REDIS_URL set.
Options: mode (pickup|e2e|drain|io), runs, n, warmup, pool, concurrency, interval_ms, url.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tasks import app, io, noop

HERE = os.path.dirname(os.path.abspath(__file__))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * 4096 // 1024
    except OSError:
        return 0


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def children(pid: int) -> list[int]:
    out = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def done_at(result: Any) -> float:
    value = result.date_done
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return float(value.timestamp())


class WorkerProc:
    def __init__(self, pool: str, concurrency: int) -> None:
        args = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", pool, "-c", str(concurrency)]
        args += ["-l", "WARNING", "--without-gossip", "--without-mingle"]
        self.proc = subprocess.Popen(args, cwd=HERE, start_new_session=True)
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("celery worker did not start")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def pickup(n: int, interval: float) -> dict[str, Any]:
    sent = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.time()
        sent.append((t0, noop.apply_async((t0,))))
    lat = [(r.get(timeout=60) - t0) * 1000 for t0, r in sent]
    return {"start_ms_p50": pct(lat, 0.5), "start_ms_p99": pct(lat, 0.99)}


def e2e(n: int, pids: list[int]) -> dict[str, Any]:
    cpu0 = sum(cpu_s(p) for p in pids)
    first = time.time()
    results = [noop.delay(0.0) for _ in range(n)]
    submitted = time.time()
    for r in results:
        r.get(timeout=600)
    cpu1 = sum(cpu_s(p) for p in pids)
    last = max(done_at(r) for r in results)
    return {
        "tasks": n,
        "makespan_s": last - first,
        "tasks_per_s": n / (last - first),
        "submit_per_s": n / (submitted - first),
        "worker_cpu_ms": (cpu1 - cpu0) * 1000,
    }


def io_run(n: int, url: str, pid: int, tag: str) -> dict[str, Any]:
    base = rss_kb(pid)
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = time.time()
    results = [io.delay(url, f"celery {tag} {i}") for i in range(n)]
    submitted = time.time()
    for r in results:
        r.get(timeout=600)
    stop.set()
    sampler.join()
    last = max(done_at(r) for r in results)
    return {
        "tasks": n,
        "makespan_s": last - first,
        "submit_s": submitted - first,
        "rss_base_mb": base / 1024,
        "rss_peak_mb": peak[0] / 1024,
        "rss_peak_kb_delta": peak[0] - base,
    }


def main() -> None:
    o = {
        "runs": 3,
        "warmup": 200,
        "pool": "prefork",
        "concurrency": 2,
        "interval_ms": 10.0,
        **json.loads(sys.argv[1]),
    }
    app.control.purge()
    if o["mode"] == "drain":
        for r in range(o["runs"] + 1):
            n = o["n"] if r else min(o["n"], o["warmup"])
            results = [noop.delay(0.0) for _ in range(n)]
            worker = WorkerProc(o["pool"], o["concurrency"])
            try:
                starts = [r_.get(timeout=600) for r_ in results]
                last = max(done_at(r_) for r_ in results)
            finally:
                worker.stop()
            if r:
                print(
                    json.dumps({"run": r, "tasks": n, "tasks_per_s": (n - 1) / (last - min(starts))}),
                    flush=True,
                )
        print(json.dumps({"done": True}), flush=True)
        return
    worker = WorkerProc(o["pool"], o["concurrency"])
    try:
        pids = children(worker.proc.pid)
        for r in range(o["runs"] + 1):
            n = o["n"] if r else min(o["n"], o["warmup"])
            if o["mode"] == "pickup":
                res = pickup(n, o["interval_ms"] / 1000)
            elif o["mode"] == "e2e":
                res = e2e(n, pids)
            else:
                res = io_run(n, o["url"], worker.proc.pid, f"{r}-{time.time_ns()}")
            if r:
                print(json.dumps({"run": r, **res}), flush=True)
    finally:
        worker.stop()
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
