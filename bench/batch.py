"""B4b: tasks accepted per second through BatchCreateTasks (batches of 4: a character's front,
side and back views and a voice line), 100 calls in flight, on the same stack shape as B4."""

from __future__ import annotations

from typing import Any

from charai.tasks.v1 import task_service_pb2

from bench.common import log
from bench.load import unary_load
from bench.ours import stack, tts_request

BATCH = 4


async def b4_batch(
    runs: int, seconds: float, concurrency: int = 100, *, gateway_processes: int = 1, channels: int = 1
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    one = tts_request("b4b-load", "submit capacity")
    request = task_service_pb2.BatchCreateTasksRequest(requests=[one] * BATCH).SerializeToString()
    env = {"CHARAI_GATEWAY_PROCESSES": str(gateway_processes)}
    async with stack(env=env, services=("task_store", "gateway")) as s:
        for r in range(runs + 1):
            res = await unary_load(
                s.gateway_grpc,
                "/charai.tasks.v1.TaskService/BatchCreateTasks",
                request,
                concurrency,
                seconds if r else min(seconds, 3.0),
                channels,
            )
            res["tasks_per_s"] = res["rps"] * BATCH
            if r:
                results.append(res)
                log(f"  charai B4b run {r}: {res['tasks_per_s']:.0f} tasks/s ({res['rps']:.0f} calls/s)")
    return results
