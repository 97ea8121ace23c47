"""The gateway restarts (``kill -9``, and SIGTERM with its drain) while 50 clients watch 50
running tasks and other clients keep submitting.

What must hold: each watcher (``CharaiClient.watch``, one connection each) resumes with the last
sequence it saw and, in the end, has seen every event of its task after its snapshot exactly
once, in order, ending with the terminal event: the same events as task_store's log. Submissions
that met the outage are resent with their request_id and not duplicated; on SIGTERM the gateway
exits within its grace period.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from .conftest import GRACE, STOP_SLACK, StackFactory
from .invariants import check_invariants, watcher_problems
from .load import Spec, Submitted, Submitter, ids, run_id, specs, submit_all


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_gateway_restart_with_50_watchers(make_stack: StackFactory, sig: int) -> None:
    async with make_stack() as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        watched = await submit_all(client, character, specs("tts", 50, "watched", "[[latency:5]]"))
        received: dict[str, list[tuple[float, task_pb2.TaskEvent]]] = {t.id: [] for t in watched}

        async def watch(task_id: str) -> None:
            async with CharaiClient(stack.gateway_grpc) as own:  # 50 clients, 50 connections
                async for event in own.watch(task_id):
                    received[task_id].append((time.monotonic(), event))

        watchers = [asyncio.create_task(watch(t.id)) for t in watched]
        end = time.monotonic() + 20
        while not all(len(events) >= 2 for events in received.values()):
            assert time.monotonic() < end, "the watchers did not get going"
            await asyncio.sleep(0.05)

        # Other clients keep submitting, one every 20 ms, through the restart.
        async with Submitter(stack.gateway_grpc, channels=2, timeout=2.0) as clients:

            async def arrive(number: int, spec: Spec) -> Submitted:
                await asyncio.sleep(number * 0.02)
                return await clients.submit(character, spec, deadline=60)

            submitting = [
                asyncio.create_task(arrive(n, s)) for n, s in enumerate(specs("tts", 100, "created"))
            ]
            await asyncio.sleep(0.3)
            began = time.monotonic()
            code = await stack.stop_service("gateway", sig)
            exited = time.monotonic()
            stopped_in = exited - began
            await asyncio.sleep(0.5)
            await stack.start_service("gateway")
            await stack.wait_ready("gateway")
            created = await asyncio.gather(*submitting)
        await asyncio.wait_for(asyncio.gather(*watchers), 60)

        if sig == signal.SIGTERM:
            assert code == 0, f"the gateway exited {code} on SIGTERM"
            assert stopped_in < GRACE + STOP_SLACK, f"the gateway took {stopped_in:.1f} s to stop"
        assert any(s.retried for s in created), "no submission met the outage"
        listed = [t async for t in client.list({"characterId": character}, page_size=100)]
        per_request = collections.Counter(t.request_id for t in listed if t.request_id)
        assert set(per_request.values()) == {1} and len(per_request) == len(created) + len(watched), (
            "duplicate tasks"
        )

        report = await check_invariants(
            stack, client, ids(watched) + ids(created), metadata={"characterId": character}, deadline=60
        )
        problems = []
        resumed = 0
        for task_id, seen in received.items():
            problems += watcher_problems(task_id, [e for _, e in seen], report.tasks[task_id].log)
            resumed += any(at > exited for at, _ in seen) and any(at < began for at, _ in seen[1:])
        assert not problems, "\n".join(problems[:10])
        assert resumed >= 25, f"only {resumed} of 50 watchers saw events both before and after the restart"
