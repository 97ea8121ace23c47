"""The gateway restarts (``kill -9``, and SIGTERM with its drain) while 50 clients watch 50
running tasks and other clients keep submitting.

What must hold: each watcher (``CharaiClient.watch``, one connection each) resumes with the last
sequence it saw and, in the end, has seen every event of its task after its snapshot exactly
once, in order, ending with the terminal event: the same events as task_store's log. Submissions
that met the outage are resent with their request_id and not duplicated; on SIGTERM the gateway
drains and exits by itself (exit code 0, its ``gateway_draining`` and ``gateway_stopped`` lines).

Nothing is raced: half the submissions go out only once the gateway is down, so some of them
meet the outage whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually

from .conftest import StackFactory
from .invariants import check_invariants, watcher_problems
from .load import Spec, Submitted, Submitter, ids, run_id, specs, submit_all

#: Submissions per phase: before the gateway goes down, and from the moment it is down.
PHASE = 50
#: What a gateway that drains and exits by itself on SIGTERM logs, in this order.
DRAIN_LINES = ("gateway_draining", "gateway_stopped")


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
        await eventually(lambda: all(len(events) >= 2 for events in received.values()), timeout=30)

        # Other clients keep submitting, one every 20 ms, through the restart: the first phase
        # from now on, the second from the moment the gateway is down.
        down = asyncio.Event()
        async with Submitter(stack.gateway_grpc, channels=2, timeout=2.0) as clients:

            async def arrive(number: int, spec: Spec) -> Submitted:
                if number >= PHASE:
                    await down.wait()
                await asyncio.sleep(number % PHASE * 0.02)
                return await clients.submit(character, spec, deadline=60)

            submitting = [
                asyncio.create_task(arrive(n, s)) for n, s in enumerate(specs("tts", 2 * PHASE, "created"))
            ]
            await asyncio.gather(*submitting[:5])  # submissions are flowing
            stopping = stack.procs["gateway"]
            began = time.monotonic()
            code = await stack.stop_service("gateway", sig)
            exited = time.monotonic()
            down.set()
            await asyncio.sleep(0.5)  # the fault itself: the gateway stays away for a while
            await stack.start_service("gateway")
            await stack.wait_ready("gateway")
            created = await asyncio.gather(*submitting)
        await asyncio.wait_for(asyncio.gather(*watchers), 60)

        if sig == signal.SIGTERM:
            assert code == 0, f"the gateway exited {code} on SIGTERM"
            assert stopping.pump is not None
            await stopping.pump  # every line it wrote
            said = [e for e in (line.get("event") for line in stopping.lines) if e in DRAIN_LINES]
            assert said == list(DRAIN_LINES), stopping.last_lines()
        assert any(s.retried for s in created[PHASE:]), "no submission met the outage"
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
