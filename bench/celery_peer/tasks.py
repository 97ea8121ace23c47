"""Celery tasks of the Celery peer (run from bench/.venv-celery, not from the project venv)."""

from __future__ import annotations

import json
import os
import time
import urllib.request

from celery import Celery

URL = os.environ["BENCH_REDIS_URL"]
app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_ignore_result=False,  # results ON: charai persists every task's state too
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def noop(t0: float) -> float:
    """Returns when it started (wall clock)."""
    return time.time()


@app.task
def io(url: str, text: str) -> int:
    """One provider call to the emulator (urllib; gevent patches it in the gevent pool)."""
    body = json.dumps({"model": "glm-tts", "input": text, "voice": "tongtong", "response_format": "wav"})
    request = urllib.request.Request(url, data=body.encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return len(response.read())
