"""``kill -9`` of a worker: during the provider call, between storing the media and recording the
result, and over and over while it holds one task (a crash loop, the only honest "poison job":
the handlers are real code and nothing in them is rigged to crash).

What must hold: the job is redelivered after the ack wait, the next attempt starts once the dead
attempt's lease expires, and the task ends exactly once with one result and one media object; a
task that keeps killing its worker fails WORKER_LOST after a bounded number of attempts instead
of being redelivered forever, and its neighbours are not dragged down with it.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.e2e.helpers import describe, provider_calls

from .conftest import StackFactory
from .invariants import check_invariants
from .load import ids, run_id, specs, submit, submit_all, wait_calls, wait_until

C = task_pb2
COMPLETED, FAILED, RUNNING = C.TASK_STATUS_COMPLETED, C.TASK_STATUS_FAILED, C.TASK_STATUS_RUNNING
STARTED = C.TASK_EVENT_TYPE_STARTED


async def test_kill_workers_during_the_provider_call(make_stack: StackFactory) -> None:
    """Both workers die while 30 provider calls are in flight: each task is redelivered, started
    again as attempt 2 (which records WORKER_LOST), calls the provider a second time (the first
    call's answer died with the process) and completes once; the dead attempts stored nothing."""
    async with make_stack() as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        items = specs("tts", 20, "kill-during-call", "[[latency:3]]") + specs(
            "image", 10, "kill-during-call", "[[latency:3]]"
        )
        submitted = await submit_all(client, character, items)
        await wait_calls(stack, [s.text for s in items], 1, timeout=20)
        await asyncio.gather(stack.kill_service("tts_worker"), stack.kill_service("image_worker"))
        await asyncio.gather(stack.start_service("tts_worker"), stack.start_service("image_worker"))
        await asyncio.gather(stack.wait_ready("tts_worker"), stack.wait_ready("image_worker"))

        report = await check_invariants(
            stack, client, ids(submitted), metadata={"characterId": character}, deadline=40
        )
        for facts in report.tasks.values():
            assert facts.task.status == COMPLETED, facts.describe()
            assert (facts.task.attempt, facts.calls) == (2, 2), facts.describe()
            second = facts.first(STARTED, attempt=2)
            assert second is not None and second.task.error.code == C.ERROR_CODE_WORKER_LOST, facts.describe()
        assert report.media_extra_messages == 0, "an attempt that died before storing wrote media"
        # JetStream redelivered the very messages the dead workers held (not the sweeper).
        finished = {
            line["task_id"]: int(line["deliveries"])
            for name in ("tts_worker", "image_worker")
            for line in stack.logs(name)
            if line.get("event") == "job_finished" and line.get("outcome") == "completed"
        }
        assert all(finished.get(i, 0) >= 2 for i in ids(submitted)), f"deliveries: {finished}"


@pytest.mark.parametrize("kill_after", [1, 20], ids=["first-store", "mid-burst"])
async def test_kill_worker_between_media_store_and_ack(make_stack: StackFactory, kill_after: int) -> None:
    """60 TTS tasks finish together; the worker is killed the moment it has logged its
    ``kill_after``-th ``media_stored`` (debug) line, so jobs are caught with the media stored but
    the result not recorded, or recorded but not acknowledged.

    Stored-not-recorded: the next attempt calls the provider again and overwrites the object
    under the same key (one object, matching the result). Recorded-not-acked: the redelivery
    finds the task ended (``job_skipped``) and only acks. Either way: completed once.
    """
    worker_env = {"tts_worker": {"CHARAI_LOG_LEVEL": "debug"}}
    async with make_stack(service_env=worker_env) as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        submitted = await submit_all(client, character, specs("tts", 60, "store-then-die", "[[latency:1]]"))
        victim = stack.procs["tts_worker"]
        end = time.monotonic() + 30
        while sum(1 for line in victim.lines if line.get("event") == "media_stored") < kill_after:
            assert time.monotonic() < end, "the worker never logged media_stored"
            await asyncio.sleep(0.002)
        await stack.kill_service("tts_worker")
        stored = {
            line["task_id"]: int(line["attempt"])
            for line in victim.lines
            if line.get("event") == "media_stored"
        }
        await stack.start_service("tts_worker")
        await stack.wait_ready("tts_worker")

        report = await check_invariants(
            stack,
            client,
            ids(submitted),
            metadata={"characterId": character},
            deadline=40,
            media_rewrites=True,
        )
        assert all(f.task.status == COMPLETED for f in report.tasks.values()), report.summary()
        successor = stack.procs["tts_worker"]
        skipped = {line["task_id"] for line in successor.lines if line.get("event") == "job_skipped"}
        rewritten = []
        for task_id, attempt in stored.items():
            facts = report.tasks[task_id]
            completed_by = facts.log[-1].task.attempt
            if completed_by != attempt:
                rewritten.append(task_id)
                # The dead attempt's media was stored; the next one called again and overwrote it.
                assert completed_by == attempt + 1 and facts.calls == attempt + 1, facts.describe()
                assert len(facts.objects) == 1, facts.describe()
        recorded_not_acked = skipped & set(stored)
        assert rewritten or recorded_not_acked, (
            f"the kill hit no job between storing its media and its ack ({len(stored)} stored when killed)"
        )
        if rewritten:
            assert report.media_extra_messages > 0, "an overwrite left no trace in the media stream"


async def test_worker_crash_loop_fails_the_task_after_bounded_attempts(make_stack: StackFactory) -> None:
    """The worker is killed three times, each time while it holds the same task: after its third
    lost attempt the task fails WORKER_LOST (CHARAI_MAX_ATTEMPTS=3), is never started again and
    costs no further provider call; the tasks that ran beside it complete at their first attempt."""
    async with (
        make_stack(env={"CHARAI_MAX_ATTEMPTS": "3"}) as stack,
        CharaiClient(stack.gateway_grpc) as client,
    ):
        character = run_id()
        [poison_spec] = specs("tts", 1, "poison", "[[latency:30]]")
        poison_id = (await submit(client, character, poison_spec)).id
        others = await submit_all(client, character, specs("image", 5, "image-bystander"))
        for attempt in (1, 2, 3):
            batch = await submit_all(client, character, specs("tts", 5, f"tts-bystander-{attempt}"))
            others += batch
            await wait_until(
                client,
                [poison_id],
                lambda t, a=attempt: t.status == RUNNING and t.attempt == a,  # type: ignore[misc]
                timeout=20,
                what=f"running attempt {attempt}",
            )
            await wait_calls(stack, [poison_spec.text], attempt, timeout=10)  # mid-call
            await wait_until(client, ids(batch), lambda t: t.status == COMPLETED, 10, "completed")
            await stack.kill_service("tts_worker")
            await stack.start_service("tts_worker")
            await stack.wait_ready("tts_worker")

        await wait_until(client, [poison_id], lambda t: t.status == FAILED, 20, "failed")
        calls = await provider_calls(stack, poison_spec.text)
        await asyncio.sleep(3)  # more than an ack wait: a redelivered job would run again now
        assert await provider_calls(stack, poison_spec.text) == calls, "the failed task was run again"

        report = await check_invariants(
            stack, client, [poison_id, *ids(others)], metadata={"characterId": character}, max_attempts=3
        )
        facts = report.tasks[poison_id]
        assert facts.task.error.code == C.ERROR_CODE_WORKER_LOST, facts.describe()
        assert facts.started_attempts == [1, 2, 3] and facts.calls == 3, facts.describe()
        for other in ids(others):
            bystander = report.tasks[other]
            assert (bystander.task.status, bystander.task.attempt) == (COMPLETED, 1), (
                f"a bystander was dragged down: {describe(bystander.log)}"
            )
