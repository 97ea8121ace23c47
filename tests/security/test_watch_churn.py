"""10,000 watch streams opened and cancelled leave the gateway where it started: no open stream
counted, and its memory (RSS of the real gateway process) within a small bound.

Why a real process (devstack) rather than the in-process gateway: the test process's own
memory would drown the gateway's, and only a process of its own shows what an operator sees.
Streams are opened 500 at a time over a few channels, each waited for until its first message
(the snapshot) arrives, so every one of them really was registered on the gateway.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.conftest import eventually

TOTAL = 10_000
BATCH = 500
WARM_UP = 1_000
#: Allowed growth of the gateway's RSS over the 10,000 streams, after a warm-up.
RSS_SLACK_KB = 20 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    env = {"CHARAI_LOG_LEVEL": "warning", "CHARAI_WATCH_HEARTBEAT_SECONDS": "30"}
    async with Stack(
        Path(tmp_path_factory.mktemp("churn")), env, services=("task_store", "gateway"), echo=echo
    ) as running:
        yield running


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def open_streams(http: aiohttp.ClientSession, stack: Stack) -> int:
    async with http.get(f"{stack.gateway_http}/healthz") as resp:
        return int((await resp.json())["open_watch_streams"])


async def churn(
    stubs: list[Any], task_id: str, count: int, http: aiohttp.ClientSession, stack: Stack
) -> None:
    """Opens and cancels ``count`` WatchTask streams, ``BATCH`` at a time."""
    request = task_service_pb2.WatchTaskRequest(id=task_id)
    for start in range(0, count, BATCH):
        calls = [stubs[i % len(stubs)].WatchTask(request) for i in range(start, min(count, start + BATCH))]
        firsts = await asyncio.gather(*(call.read() for call in calls))
        assert all(
            f is not grpc.aio.EOF and f.event.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT for f in firsts
        )
        assert await open_streams(http, stack) == len(calls)
        for call in calls:
            call.cancel()

        async def released() -> bool:
            return await open_streams(http, stack) == 0

        await eventually(released, timeout=10)


@pytest.mark.timeout(240)  # ~20 s on an idle 2-core machine; generous for a loaded one
async def test_ten_thousand_watch_streams_leave_no_trace(stack: Stack) -> None:
    started = time.monotonic()
    channels = [grpc.aio.insecure_channel(stack.gateway_grpc) for _ in range(4)]
    try:
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        created = await stubs[0].CreateTask(
            task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                tts=task_pb2.TtsPayload(
                    character_id="char_churn", text="stay queued", voice_style="tongtong"
                ),
            )
        )
        task_id = created.task.id  # no worker runs: the task stays queued, its watches stay open
        pid = stack.pid("gateway")
        async with aiohttp.ClientSession() as http:
            await churn(stubs, task_id, WARM_UP, http, stack)
            before = rss_kb(pid)
            await churn(stubs, task_id, TOTAL, http, stack)
            assert await open_streams(http, stack) == 0
            after = rss_kb(pid)
    finally:
        for channel in channels:
            await channel.close()
    elapsed = time.monotonic() - started
    print(
        f"gateway RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB over {TOTAL} streams, {elapsed:.1f} s"
    )
    assert after - before <= RSS_SLACK_KB, f"gateway RSS grew {(after - before) / 1024:.1f} MiB"
    assert stack.running("gateway")
