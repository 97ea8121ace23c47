"""task_store dies (``kill -9``) or is stopped (SIGTERM) in the middle of a burst of 200
CreateTask calls whose clients retry with the same ``request_id`` until they get an OK.

What must hold: every submission that got OK survives (GetTask finds it after the restart, and it
completes), and there are no duplicates (ListTasks over the test's characterId has exactly one
task per request_id, the one each client was told about). Workers that were running tasks
meanwhile re-send their results until task_store is back instead of dropping finished work (no
attempt is repeated: no media is written twice), and clients watching tasks through the outage
see every event once.
"""

from __future__ import annotations

import asyncio
import collections
import signal

import aiohttp
import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually

from .conftest import StackFactory
from .invariants import check_invariants, watcher_problems
from .load import Spec, Submitted, Submitter, ids, run_id, specs

#: Submissions from this one on are sent only once task_store is down.
AFTER_DOWN = 160
#: What a task_store that drains and exits by itself on SIGTERM logs, in this order.
DRAIN_LINES = ("task_store_draining", "task_store_stopped")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_task_store_restart_during_a_burst_of_creates(make_stack: StackFactory, sig: int) -> None:
    async with make_stack() as stack, CharaiClient(stack.gateway_grpc) as watching:
        character = run_id()
        items = specs("tts", 200, "burst", "[[latency:0.5]]")
        oks: list[Submitted] = []
        halfway = asyncio.Event()
        # The first 20 tasks answered are watched live through the outage.
        seen: dict[str, list[task_pb2.TaskEvent]] = {}
        watchers: list[asyncio.Task[None]] = []

        async def watch(task_id: str) -> None:
            seen[task_id] = [event async for event in watching.watch(task_id)]

        def answered(result: Submitted) -> None:
            oks.append(result)
            if len(watchers) < 20 and result.task is not None:
                watchers.append(asyncio.create_task(watch(result.task.id)))

        # Impatient clients (1 s deadline) arriving one every 15 ms: task_store goes down when the
        # 60th has sent its request, so the later ones meet the stop and the outage, time out and
        # send again with the same request_id (some after task_store had committed their first
        # try). The last 40 arrive only once task_store is down: some clients meet the outage
        # whatever the machine's speed.
        down = asyncio.Event()
        async with Submitter(stack.gateway_grpc, channels=4, timeout=1.0) as clients:

            async def arrive(number: int, spec: Spec) -> Submitted:
                if number >= AFTER_DOWN:
                    await down.wait()
                    await asyncio.sleep((number - AFTER_DOWN) * 0.015)
                else:
                    await asyncio.sleep(number * 0.015)
                if number == 60:
                    halfway.set()
                return await clients.submit(character, spec, deadline=60, on_ok=answered)

            pending = [asyncio.create_task(arrive(n, s)) for n, s in enumerate(items)]
            await halfway.wait()
            ok_before = len(oks)
            stopping = stack.procs["task_store"]
            code = await stack.stop_service("task_store", sig)
            down.set()
            # The fault itself: task_store stays away for at least a client's deadline (1 s).
            await asyncio.sleep(1.0)
            await stack.start_service("task_store")
            await stack.wait_ready("task_store")
            submitted = await asyncio.gather(*pending)
        await asyncio.wait_for(asyncio.gather(*watchers), 60)

        assert 0 < ok_before < len(items), f"{ok_before} creates were answered before task_store went down"
        retried = [s for s in submitted if s.retried]
        assert retried, "no client met the outage: the test did not exercise retries with a request_id"
        assert any(s.retried for s in submitted[AFTER_DOWN:]), "no client that came during the outage retried"
        if sig == signal.SIGTERM:
            assert code == 0, f"task_store exited {code} on SIGTERM"
            assert stopping.pump is not None
            await stopping.pump  # every line it wrote
            said = [e for e in (line.get("event") for line in stopping.lines) if e in DRAIN_LINES]
            assert said == list(DRAIN_LINES), stopping.last_lines()

        async with CharaiClient(stack.gateway_grpc) as client:
            listed = [t async for t in client.list({"characterId": character}, page_size=100)]
            per_request = collections.Counter(t.request_id for t in listed)
            duplicates = {r: n for r, n in per_request.items() if n != 1}
            assert not duplicates, f"request ids with more than one task: {duplicates}"
            by_request = {t.request_id: t.id for t in listed}
            told = {s.spec.request_id: s.task.id for s in submitted if s.task is not None}
            assert told == by_request, "a client was told about another task than the one stored"

            report = await check_invariants(
                stack, client, ids(submitted), metadata={"characterId": character}, deadline=60
            )
        assert all(f.task.status == task_pb2.TASK_STATUS_COMPLETED for f in report.tasks.values()), (
            report.summary()
        )
        problems = [p for i, events in seen.items() for p in watcher_problems(i, events, report.tasks[i].log)]
        assert len(seen) == 20 and not problems, "\n".join(problems[:10])


async def test_the_gateways_healthz_says_not_serving_while_task_store_is_away(
    make_stack: StackFactory,
) -> None:
    """``GET /healthz`` follows the gRPC health: 503 ``not_serving`` while task_store is down (it
    reported NATS alone, so an HTTP load balancer kept sending work to a gateway that could reach
    no task_store), 200 ``serving`` again once it is back."""
    async with make_stack() as stack, aiohttp.ClientSession() as http:

        async def healthz() -> tuple[int, str]:
            async with http.get(f"{stack.gateway_http}/healthz") as resp:
                return resp.status, (await resp.json())["status"]

        async def becomes(expected: tuple[int, str]) -> bool:
            return await healthz() == expected

        await eventually(lambda: becomes((200, "serving")), timeout=30)
        await stack.stop_service("task_store")
        await eventually(lambda: becomes((503, "not_serving")), timeout=30)
        await stack.start_service("task_store")
        await stack.wait_ready("task_store")
        await eventually(lambda: becomes((200, "serving")), timeout=60)
