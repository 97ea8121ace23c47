"""The peers: BullMQ 6 (Node, bench/node) and Celery 5 (bench/.venv-celery), each on its own
redis-server started here, and the one-time setup of both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import CELERY_VENV, NODE_DIR, RedisServer, child, cpu_seconds, log, redis_server

CELERY_DIR = NODE_DIR.parent / "celery_peer"


# -- setup --------------------------------------------------------------------------------------
def setup(*, node: bool = True, celery: bool = True) -> None:
    """Installs what the peers need, once: redis-server (Debian), bullmq + ioredis (npm, locked
    by bench/node/package-lock.json), Celery with the Redis transport and gevent (PyPI)."""
    if shutil.which("redis-server") is None:
        log("installing redis-server (apt-get)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if node and not (NODE_DIR / "node_modules" / "bullmq").exists():
        if shutil.which("npm") is None:
            raise RuntimeError("npm not found: install Node.js 18+ (apt-get install nodejs npm)")
        log("installing bullmq and ioredis (npm ci)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True)
    if celery:
        _celery_venv()


def _celery_venv() -> None:
    """bench/.venv-celery on the interpreter charai's own venv runs on (``make install``'s
    ``VENV_PYTHON``), made again when that changed: both Python systems of a run then share one
    interpreter build, and a faster one (PGO) helps each alike."""
    base = os.path.realpath(sys._base_executable)  # what .venv was made from, not .venv's link
    stamp = CELERY_VENV / ".base-python"
    if (CELERY_VENV / "bin" / "python").exists() and stamp.exists() and stamp.read_text() == base:
        return
    log(f"creating bench/.venv-celery on {base} (celery[redis] 5, redis-py, gevent)")
    shutil.rmtree(CELERY_VENV, ignore_errors=True)
    # uv, not `python -m venv`: a distribution's interpreter may come without ensurepip.
    uv = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "uv"
    subprocess.run([str(uv), "venv", "-q", "--python", base, str(CELERY_VENV)], check=True)
    subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "-q",
            "--python",
            str(CELERY_VENV / "bin" / "python"),
            "celery[redis]==5.*",
            "redis>=6.1",
            "gevent",
        ],
        check=True,
    )
    stamp.write_text(base)


def _lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# -- BullMQ -------------------------------------------------------------------------------------
async def bullmq(durable: bool, mode: str, timeout: float = 900, **options: Any) -> list[dict[str, Any]]:
    """Runs bench/node/bullmq_bench.js against a fresh redis-server; returns the measured runs."""
    async with redis_server(durable) as redis:
        runs = await _bullmq_on(redis, mode, timeout, **options)
    label = "BullMQ durable" if durable else "BullMQ"
    for r in runs:
        log(
            f"  {label} {mode} run {r['run']}: "
            + ", ".join(
                f"{k}={v:.3g}"
                for k, v in r.items()
                if isinstance(v, float) and k.endswith(("p50", "per_s", "makespan_s"))
            )
        )
    return runs


async def _bullmq_on(redis: RedisServer, mode: str, timeout: float, **options: Any) -> list[dict[str, Any]]:
    opts = {"redis": redis.url, "mode": mode, **options}
    cpu0 = cpu_seconds(redis.pid)
    async with child(
        ["node", "bullmq_bench.js", json.dumps(opts)],
        cwd=NODE_DIR,
        name="bullmq",
        ready='{"done":true}',
        timeout=timeout,
    ) as (_, lines):
        pass
    runs = [r for r in _lines(lines) if "run" in r]
    if not runs:
        raise RuntimeError("bullmq_bench.js gave no result:\n" + "\n".join(lines[-30:]))
    redis_cpu = cpu_seconds(redis.pid) - cpu0
    for r in runs:
        r["redis_cpu_s_whole_session"] = redis_cpu
    return runs


# -- Celery -------------------------------------------------------------------------------------
async def celery(mode: str, timeout: float = 900, **options: Any) -> list[dict[str, Any]]:
    """Runs bench/celery_peer/driver.py (Redis broker and result backend, no persistence)."""
    py = CELERY_VENV / "bin" / "python"
    async with redis_server(False) as redis:
        env = {"BENCH_REDIS_URL": redis.url}
        async with child(
            [str(py), "driver.py", json.dumps({"mode": mode, **options})],
            cwd=CELERY_DIR,
            env=env,
            name="celery",
            ready='{"done": true}',
            timeout=timeout,
        ) as (_, lines):
            pass
    runs = [r for r in _lines(lines) if "run" in r]
    if not runs:
        raise RuntimeError("celery driver gave no result:\n" + "\n".join(lines[-30:]))
    for r in runs:
        log(
            f"  Celery {options.get('pool', 'prefork')} {mode} run {r['run']}: "
            + ", ".join(
                f"{k}={v:.3g}"
                for k, v in r.items()
                if isinstance(v, float) and k.endswith(("p50", "per_s", "makespan_s"))
            )
        )
    return runs
