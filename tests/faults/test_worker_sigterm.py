"""SIGTERM to a worker under load (each kind): it takes no new job, lets what it holds finish
within CHARAI_SHUTDOWN_GRACE_SECONDS, hands the rest back, and exits; after a new worker starts
no task is lost.

"Hands back" means through task_store (a RETRY_SCHEDULED with WORKER_LOST right at the end of
the grace period), not only a ``nak``: otherwise the task would stay RUNNING under the dead
worker's lease and every other worker would defer it until the lease expired.

Nothing here is timed: "within its grace" is the worker ending by itself (exit code 0, its
``worker_draining`` and ``worker_stopped`` lines) with the short jobs completed and the long ones
handed back before it exited (store times against the moment the exit was seen); "not left to
the lease" is the long tasks being QUEUED again, not RUNNING, while no worker of their kind runs.
The grace (5 s) and the two job lengths (1.5 s and 12 s) are far enough apart that a loaded
machine cannot move a job from one side of the grace to the other.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from .conftest import StackFactory
from .invariants import check_invariants, seconds_of
from .load import ids, run_id, specs, submit_all, wait_calls, wait_until

C = task_pb2
#: Long enough that a task left RUNNING under the stopped worker's lease would visibly wait for it.
LONG_LEASE = 20.0
GRACE = 5.0


@pytest.mark.timeout(240)  # two attempts of 12 s jobs, on a machine that may be busy
@pytest.mark.parametrize("kind", ["tts", "image"])
async def test_worker_sigterm_finishes_or_hands_back(make_stack: StackFactory, kind: str) -> None:
    worker = f"{kind}_worker"
    env = {
        "CHARAI_LEASE_SECONDS": f"{LONG_LEASE:g}",
        "CHARAI_SHUTDOWN_GRACE_SECONDS": f"{GRACE:g}",
        # The long jobs' calls must not time out instead of being handed back.
        f"CHARAI_{kind.upper()}_TIMEOUT_SECONDS": "60",
    }
    async with make_stack(env=env) as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        short = await submit_all(client, character, specs(kind, 10, "drained", "[[latency:1.5]]"))
        long = await submit_all(client, character, specs(kind, 10, "handed-back", "[[latency:12]]"))
        await wait_calls(stack, [task.tts.text or task.image.prompt for task in short + long], 1, 20)

        stopping = stack.procs[worker]
        stopping.process.send_signal(signal.SIGTERM)
        # Submitted once it drains (the signal is asynchronous): none of these may start.
        await stack.wait_for_line(worker, "worker_draining", 60)
        late = await submit_all(client, character, specs(kind, 5, "after-sigterm"))
        # A hang guard only (far beyond the grace): the worker must end by itself.
        code = await asyncio.wait_for(stopping.process.wait(), 60)
        exited_wall = time.time()
        assert stopping.pump is not None
        await stopping.pump  # every line it wrote
        assert code == 0, f"{worker} exited {code} on SIGTERM"
        said = [
            line["event"]
            for line in stopping.lines
            if line.get("event") in ("worker_draining", "worker_stopped")
        ]
        assert said == ["worker_draining", "worker_stopped"], stopping.last_lines()
        # It took no new work while draining.
        await wait_until(client, ids(late), lambda t: t.attempt == 0, 1, "untouched")
        # What it could not finish it handed back through the store: queued again, no lease left
        # to wait out (no worker of this kind runs now, so nothing else could have moved them).
        handed = await wait_until(client, ids(long), lambda t: t.attempt == 1, 1, "attempted once")
        assert {t.status for t in handed.values()} == {C.TASK_STATUS_QUEUED}, handed

        restarted_wall = time.time()
        await stack.start_service(worker)
        await stack.wait_ready(worker)
        report = await check_invariants(
            stack, client, ids(short + long + late), metadata={"characterId": character}, deadline=90
        )
        for task in short:  # finished during the drain, by the attempt that had them
            facts = report.tasks[task.id]
            assert (facts.task.status, facts.task.attempt) == (C.TASK_STATUS_COMPLETED, 1), facts.describe()
            assert seconds_of(facts.log[-1].time) < exited_wall, facts.describe()
        for task in long:  # handed back at the end of the grace period, then run again
            facts = report.tasks[task.id]
            assert (facts.task.status, facts.task.attempt, facts.calls) == (C.TASK_STATUS_COMPLETED, 2, 2), (
                facts.describe()
            )
            [retry] = facts.retries
            assert retry.task.error.code == C.ERROR_CODE_WORKER_LOST, facts.describe()
            assert "handed the job back" in retry.task.error.message, facts.describe()
            assert seconds_of(retry.time) < exited_wall, f"late: {facts.describe()}"
            second = facts.first(C.TASK_EVENT_TYPE_STARTED, attempt=2)
            assert second is not None and seconds_of(second.time) >= restarted_wall, facts.describe()
        for task in late:
            facts = report.tasks[task.id]
            first = facts.first(C.TASK_EVENT_TYPE_STARTED, attempt=1)
            assert first is not None and seconds_of(first.time) >= restarted_wall, facts.describe()
            assert facts.task.status == C.TASK_STATUS_COMPLETED, facts.describe()
