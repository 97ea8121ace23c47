"""SIGTERM to a worker under load (each kind): it takes no new job, lets what it holds finish
within CHARAI_SHUTDOWN_GRACE_SECONDS, hands the rest back, and exits; after a new worker starts
no task is lost.

"Hands back" means through task_store (a RETRY_SCHEDULED with WORKER_LOST right at the end of
the grace period), not only a ``nak``: otherwise the task would stay RUNNING under the dead
worker's lease and every other worker would defer it until the lease expired.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from .conftest import GRACE, STOP_SLACK, StackFactory
from .invariants import check_invariants, seconds_of
from .load import ids, run_id, specs, submit_all, wait_calls, wait_until

C = task_pb2
#: Long enough that a task left RUNNING under the stopped worker's lease would visibly wait for it.
LONG_LEASE = 20.0


@pytest.mark.parametrize("kind", ["tts", "image"])
async def test_worker_sigterm_finishes_or_hands_back(make_stack: StackFactory, kind: str) -> None:
    worker = f"{kind}_worker"
    env = {"CHARAI_LEASE_SECONDS": f"{LONG_LEASE:g}"}
    async with make_stack(env=env) as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        short = await submit_all(client, character, specs(kind, 10, "drained", "[[latency:1.5]]"))
        long = await submit_all(client, character, specs(kind, 10, "handed-back", "[[latency:5]]"))
        await wait_calls(stack, [task.tts.text or task.image.prompt for task in short + long], 1, 20)

        proc = stack.procs[worker].process
        began, began_wall = time.monotonic(), time.time()
        proc.send_signal(signal.SIGTERM)
        late = await submit_all(client, character, specs(kind, 5, "after-sigterm"))
        code = await asyncio.wait_for(proc.wait(), GRACE + 10)
        stopped_in = time.monotonic() - began
        assert code == 0, f"{worker} exited {code} on SIGTERM"
        assert stopped_in < GRACE + STOP_SLACK, f"{worker} took {stopped_in:.1f} s to stop (grace {GRACE} s)"
        # It took no new work while draining.
        await wait_until(client, ids(late), lambda t: t.attempt == 0, 1, "untouched")

        restarted_wall = time.time()
        await stack.start_service(worker)
        await stack.wait_ready(worker)
        report = await check_invariants(
            stack, client, ids(short + long + late), metadata={"characterId": character}, deadline=40
        )
        for task in short:  # finished during the drain, by the attempt that had them
            facts = report.tasks[task.id]
            assert (facts.task.status, facts.task.attempt) == (C.TASK_STATUS_COMPLETED, 1), facts.describe()
            assert seconds_of(facts.log[-1].time) < began_wall + GRACE + STOP_SLACK, facts.describe()
        for task in long:  # handed back at the end of the grace period, then run again
            facts = report.tasks[task.id]
            assert (facts.task.status, facts.task.attempt, facts.calls) == (C.TASK_STATUS_COMPLETED, 2, 2), (
                facts.describe()
            )
            [retry] = facts.retries
            assert retry.task.error.code == C.ERROR_CODE_WORKER_LOST, facts.describe()
            assert "handed the job back" in retry.task.error.message, facts.describe()
            assert seconds_of(retry.time) < began_wall + GRACE + STOP_SLACK, f"late: {facts.describe()}"
            second = facts.first(C.TASK_EVENT_TYPE_STARTED, attempt=2)
            assert second is not None
            waited = seconds_of(second.time) - restarted_wall
            assert waited < LONG_LEASE / 2, f"waited {waited:.1f} s, for the lease? {facts.describe()}"
        for task in late:
            facts = report.tasks[task.id]
            first = facts.first(C.TASK_EVENT_TYPE_STARTED, attempt=1)
            assert first is not None and seconds_of(first.time) >= restarted_wall, facts.describe()
            assert facts.task.status == C.TASK_STATUS_COMPLETED, facts.describe()
