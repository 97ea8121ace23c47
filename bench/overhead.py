"""One task's overhead on this machine: submit → worker start, and worker done → client sees it.

Runs the real stack (devstack) with the emulator at zero latency, submits tasks one at a time
while watching them, and reports medians and p99 from the client's clock (receipt of each event)
and the store's clock (event times). Usage: ``.venv/bin/python bench/overhead.py [N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"CHARAI_LOG_LEVEL": "warning"}
        async with contextlib.AsyncExitStack() as exits:
            stack = await exits.enter_async_context(Stack(Path(tmp), env, emulator_args=["--latency", "0"]))
            client = await exits.enter_async_context(CharaiClient(stack.gateway_grpc))
            pickup: list[float] = []
            delivery: list[float] = []
            submit_rpc: list[float] = []
            total: list[float] = []
            seen: dict[str, dict[int, tuple[float, float]]] = {}  # type -> (receipt, lag s)
            arrived = asyncio.Event()

            async def listen() -> None:
                async for event in client.watch_tasks({"characterId": "char_bench"}):
                    times = seen.setdefault(event.task.id, {})
                    lag = time.time() - event.time.ToNanoseconds() / 1e9
                    times.setdefault(event.type, (time.perf_counter(), lag))
                    arrived.set()

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.5)
            for i in range(n + 5):
                t0 = time.perf_counter()
                task = await client.create_tts("char_bench", f"overhead {i}", voice_style="tongtong")
                t1 = time.perf_counter()
                while task_pb2.TASK_EVENT_TYPE_COMPLETED not in seen.get(task.id, {}):
                    arrived.clear()
                    await arrived.wait()
                if i < 5:
                    continue  # warm-up
                times = seen[task.id]
                started_at, _ = times[task_pb2.TASK_EVENT_TYPE_STARTED]
                done_at, _ = times[task_pb2.TASK_EVENT_TYPE_COMPLETED]
                submit_rpc.append((t1 - t0) * 1000)
                pickup.append((started_at - t0) * 1000)
                # Worker done (completion committed by task_store) -> the client holds the event;
                # same machine, same wall clock.
                _, lag = times[task_pb2.TASK_EVENT_TYPE_COMPLETED]
                delivery.append(lag * 1000)
                total.append((done_at - t0) * 1000)
            listener.cancel()
    result = {
        "create_rpc_ms_p50": statistics.median(submit_rpc),
        "submit_to_started_at_client_ms_p50": statistics.median(pickup),
        "submit_to_started_at_client_ms_p99": pct(pickup, 0.99),
        "completed_commit_to_client_ms_p50": statistics.median(delivery),
        "completed_commit_to_client_ms_p99": pct(delivery, 0.99),
        "submit_to_completed_at_client_ms_p50": statistics.median(total),
        "tasks": n,
    }
    return result


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    print(json.dumps(asyncio.run(main(count)), indent=2))
