"""NATS restarts (SIGTERM and ``kill -9``, same port, same store directory) with 100 tasks in
flight, and 20 more submitted while it is down.

What must hold: nobody is restarted by hand. The outbox relay publishes what was accepted during
the outage once NATS is back, the workers' consumers resume, events missed by watchers are read
from the log, and every task reaches a terminal state within the deadline; none is stuck.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.e2e.helpers import emulator_stats

from .conftest import StackFactory
from .invariants import check_invariants
from .load import ids, run_id, specs, submit_all


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
async def test_nats_restart_under_load(make_stack: StackFactory, sig: int) -> None:
    async with make_stack() as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        items = (
            specs("tts", 50, "nats-slow", "[[latency:2]]")
            + specs("image", 25, "nats-slow", "[[latency:2]]")
            + specs("tts", 25, "nats-fast")
        )
        before = await submit_all(client, character, items)
        end = time.monotonic() + 20
        while (await asyncio.to_thread(emulator_stats, stack))["total_calls"] < 40:
            assert time.monotonic() < end, "the load never reached the provider"
            await asyncio.sleep(0.05)

        await stack.stop_service("nats", sig)
        # Accepted while NATS is down: committed with their outbox rows, published later.
        during = await asyncio.wait_for(
            submit_all(client, character, specs("tts", 20, "nats-outage", "[[latency:0.5]]")), 20
        )
        await asyncio.sleep(1.0)
        await stack.start_nats()

        report = await check_invariants(
            stack,
            client,
            ids(before + during),
            metadata={"characterId": character},
            deadline=60,
            media_rewrites=True,
        )
        assert all(f.task.status == task_pb2.TASK_STATUS_COMPLETED for f in report.tasks.values()), (
            report.summary()
            + "; "
            + "; ".join(f.describe() for f in report.tasks.values() if f.task.attempt > 1)
        )
        # Nobody was restarted: each service saw the outage and reconnected on its own.
        for name in ("task_store", "gateway", "image_worker", "tts_worker"):
            assert len([p for p in stack.history if p.name == name]) == 1
            await stack.wait_for_line(name, "nats_reconnected", 5)
