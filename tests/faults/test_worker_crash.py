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
import contextlib
import signal
from collections.abc import Iterator

import grpc
import pytest
from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually
from tests.e2e.helpers import describe, provider_calls, set_gate, wait_held

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


#: Tasks caught between storing their media and their ack.
BETWEEN = 10


@contextlib.contextmanager
def frozen(process: asyncio.subprocess.Process) -> Iterator[None]:
    """SIGSTOP ``process`` for the block (SIGCONT after it, whatever happens)."""
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("recorded", [False, True], ids=["stored-not-recorded", "recorded-not-acked"])
async def test_kill_worker_between_media_store_and_ack(make_stack: StackFactory, recorded: bool) -> None:
    """The worker is killed with jobs caught between storing their media and their ack, arranged,
    not raced: the provider holds all ten calls at its gate until task_store is frozen (SIGSTOP),
    so the worker stores each task's media and then cannot record the result.

    Stored-not-recorded: task_store (still frozen, the results unread in its socket) and the
    worker are killed, task_store restarted. The next attempt calls the provider again and
    overwrites the object under the same key (one object, matching the result).
    Recorded-not-acked: NATS is killed, then task_store thawed: the worker records every result
    but holds the acks while it reconnects, and is killed with them. The redelivery finds the
    task ended (``job_skipped``) and only acks. Either way: completed once.
    """
    settings = {"CHARAI_TTS_TIMEOUT_SECONDS": "120"}  # the calls wait at the gate meanwhile
    worker_env = {"tts_worker": {"CHARAI_LOG_LEVEL": "debug"}}
    async with (
        make_stack(settings, service_env=worker_env) as stack,
        CharaiClient(stack.gateway_grpc) as client,
    ):
        character = run_id()
        await set_gate(stack, open=False)
        submitted = await submit_all(client, character, specs("tts", BETWEEN, "store-then-die"))
        await wait_held(stack, BETWEEN)  # every job claimed, its provider call made
        victim = stack.procs["tts_worker"]

        def media_stored() -> dict[str, int]:
            lines = victim.lines
            return {
                line["task_id"]: int(line["attempt"]) for line in lines if line.get("event") == "media_stored"
            }

        with frozen(stack.procs["task_store"].process):
            await set_gate(stack, open=True)
            await eventually(lambda: len(media_stored()) == BETWEEN, timeout=60)
            if recorded:
                # The acks will have nowhere to go: the worker keeps them while it reconnects.
                await stack.stop_service("nats", signal.SIGKILL)
            else:
                # The results the worker sent wait unread in the frozen task_store's socket: it
                # dies with them (a thawed one would record them after the worker's death).
                await stack.kill_service("task_store")
        if recorded:

            async def all_recorded() -> bool:
                try:
                    tasks = await asyncio.gather(*(client.get(i) for i in ids(submitted)))
                except grpc.aio.AioRpcError:
                    return False  # task_store is only just thawing
                return all(t.status == COMPLETED for t in tasks)

            await eventually(all_recorded, timeout=60)
        stored = media_stored()
        await stack.kill_service("tts_worker")  # with the unsent acks
        if recorded:
            await stack.start_nats()
        else:
            await stack.start_service("task_store")
            await stack.wait_ready("task_store")
        await stack.start_service("tts_worker")
        await stack.wait_ready("tts_worker")
        successor = stack.procs["tts_worker"]

        def skipped() -> set[str]:
            return {line["task_id"] for line in successor.lines if line.get("event") == "job_skipped"}

        if recorded:
            # Redelivered once the ack wait runs out, found ended, acknowledged without a call.
            await eventually(lambda: skipped() == set(ids(submitted)), timeout=90)

        report = await check_invariants(
            stack,
            client,
            ids(submitted),
            metadata={"characterId": character},
            deadline=40,
            media_rewrites=not recorded,
        )
        assert all(f.task.status == COMPLETED for f in report.tasks.values()), report.summary()
        assert set(stored) == set(ids(submitted))
        for task_id, attempt in stored.items():
            facts = report.tasks[task_id]
            completed_by = facts.log[-1].task.attempt
            assert len(facts.objects) == 1, facts.describe()
            if recorded:
                # Recorded by the killed worker's call, redelivered, found ended, acknowledged.
                assert (completed_by, facts.calls) == (attempt, attempt), facts.describe()
            else:
                # The dead attempt's media was stored; the next one called again and overwrote it.
                assert completed_by == attempt + 1 and facts.calls == attempt + 1, facts.describe()
        if not recorded:
            assert not skipped(), skipped()
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
