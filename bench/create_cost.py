"""What a task costs each process when it arrives alone or in a batch: ``python -m bench.create_cost
[--seconds S] [--pairs P] [--batch B] [--concurrency C]``.

B4's load (``CreateTask``, C calls in flight) and B4b's (``BatchCreateTasks`` of B) alternate P
times on one stack (task_store and gateway, no worker), after a warm-up of each. Every run prints
the tasks per second and the CPU-µs per task of the gateway, task_store and this process (the
load generator shares the two cores, as in B4 and B4b), from /proc and ``time.process_time``.

Then the bound this puts on B4b's ratio to B4 (issue 12 asks for 4 times B4). Both shapes are CPU-bound
on the same cores, so the ratio of their tasks per second is about the inverse ratio of their CPU
per task. A create's own work in task_store (the rows, the indexes, the events; ``store_each`` below)
is paid per task in both; what a batch saves is the per-call part: the gateway's and the load
generator's unary call, and task_store's message on the gateway's stream (``store_per_call``: the
store's CPU per task for ``CreateTask`` less that for the batch). So with the medians measured

    ratio(x) = (gateway_1 + loadgen_1 + store_per_call + x) / (gateway_B + loadgen_B + x)

where ``x`` is the store's work per task. The tool prints it at the measured ``x`` (close to the
measured ratio) and at ``x = 0``: the ceiling if every create cost task_store nothing at all; and
the ``x`` at which the ratio would reach 4 (what task_store could spend on a task's rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from charai.tasks.v1 import task_service_pb2

from bench.common import cpu_seconds, log
from bench.load import unary_load
from bench.ours import pid, stack, tts_request

PROCS = ("gateway", "task_store", "loadgen")
#: Issue 12's minimum for B4b: tasks per second through batches of 4, against B4's.
GOAL = 4.0


async def measure(seconds: float, pairs: int, batch: int, concurrency: int) -> list[dict[str, Any]]:
    one = tts_request("create-cost", "submit capacity")
    shapes = {
        "CreateTask": (one.SerializeToString(), 1),
        "BatchCreateTasks": (
            task_service_pb2.BatchCreateTasksRequest(requests=[one] * batch).SerializeToString(),
            batch,
        ),
    }
    runs: list[dict[str, Any]] = []
    async with stack(services=("task_store", "gateway")) as s:
        pids = {"gateway": pid(s, "gateway"), "task_store": pid(s, "task_store")}

        def cpu() -> dict[str, float]:
            return {**{k: cpu_seconds(p) for k, p in pids.items()}, "loadgen": time.process_time()}

        for p in range(pairs + 1):
            for method, (request, per_call) in shapes.items():
                before = cpu()
                res = await unary_load(
                    s.gateway_grpc,
                    f"/charai.tasks.v1.TaskService/{method}",
                    request,
                    concurrency,
                    seconds if p else min(seconds, 2.0),
                )
                after = cpu()
                if not p:
                    continue  # the warm-up
                tasks = res["calls"] * per_call
                run = {"method": method, "tasks_per_s": res["rps"] * per_call, "errors": res["errors"]}
                run.update({f"{k}_us": 1e6 * (after[k] - before[k]) / tasks for k in PROCS})
                runs.append(run)
                log(
                    f"  {method}: {run['tasks_per_s']:.0f} tasks/s, CPU-us per task "
                    + ", ".join(f"{k} {run[k + '_us']:.0f}" for k in PROCS)
                )
    return runs


def bound(runs: list[dict[str, Any]]) -> dict[str, float]:
    def median(method: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs if r["method"] == method))

    g1, s1, l1 = (median("CreateTask", f"{k}_us") for k in PROCS)
    gb, sb, lb = (median("BatchCreateTasks", f"{k}_us") for k in PROCS)
    per_call = max(0.0, s1 - sb)
    fixed_1, fixed_b = g1 + l1 + per_call, gb + lb  # what is not the store's work per task

    def ratio(x: float) -> float:
        return (fixed_1 + x) / (fixed_b + x)

    return {
        "measured_ratio": median("BatchCreateTasks", "tasks_per_s") / median("CreateTask", "tasks_per_s"),
        "store_each_us": sb,
        "store_per_call_us": per_call,
        "ratio_at_measured_store_cost": ratio(sb),
        "ratio_if_creates_cost_the_store_nothing": ratio(0.0),
        # ratio(x) = GOAL solved for x (negative: out of reach even at no cost at all).
        f"store_us_per_task_for_{GOAL:g}x": (fixed_1 - GOAL * fixed_b) / (GOAL - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.create_cost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs of runs (after a warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="requests per BatchCreateTasks (B4b: 4)")
    parser.add_argument("--concurrency", type=int, default=100, help="calls in flight (B4, B4b: 100)")
    args = parser.parse_args()
    runs = asyncio.run(measure(args.seconds, args.pairs, args.batch, args.concurrency))
    rounded = [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in runs]
    print(json.dumps({"runs": rounded, "bound": {k: round(v, 2) for k, v in bound(runs).items()}}, indent=1))


if __name__ == "__main__":
    main()
