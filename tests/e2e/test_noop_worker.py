"""``charai.devstack.noop_worker``, the worker ``make bench`` B2 measures the queue with: the TTS
worker's runtime with a handler that does nothing. Through the real stack its tasks run the whole
lifecycle (queued, started, completed, one attempt) with the line's text as their result, no audio,
and not one call to the provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.conftest import eventually
from tests.e2e.conftest import fast_stack
from tests.e2e.helpers import emulator_stats, history, unique

E = task_pb2
TASKS = 12


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with fast_stack(tmp_path_factory, services=("task_store", "gateway")) as running:
        await running.start_service("tts_worker", service="devstack.noop_worker")
        await running.wait_for_line("tts_worker", "worker_started", 60)
        yield running


def line(text: str) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=E.TASK_TYPE_TTS_GENERATION,
        tts=E.TtsPayload(character_id="noop", text=text, voice_style="tongtong"),
    )


async def test_the_noop_worker_completes_tasks_without_calling_the_provider(stack: Stack) -> None:
    calls_before = emulator_stats(stack)["calls"]
    texts = [unique(f"noop line {i}") for i in range(TASKS)]
    async with CharaiClient(stack.gateway_grpc) as client:
        created = await asyncio.gather(*(client.create(line(text)) for text in texts))
        logs = await asyncio.gather(*(history(client, task.id, timeout=60) for task in created))
        for task, text, events in zip(created, texts, logs, strict=True):
            assert [e.type for e in events][-1] == E.TASK_EVENT_TYPE_COMPLETED, events
            assert E.TASK_EVENT_TYPE_STARTED in [e.type for e in events]
            done = await client.get(task.id)
            assert done.status == E.TASK_STATUS_COMPLETED and done.attempt == 1
            assert done.tts_result.text == text and not done.tts_result.audio_url
    assert emulator_stats(stack)["calls"] == calls_before

    def finished() -> list[str]:
        lines = stack.procs["tts_worker"].lines
        return [ln["outcome"] for ln in lines if ln.get("event") == "job_finished"]

    # The worker logs a job's end after its outcome is stored, so a client may see COMPLETED
    # before the line is written (and read from the worker's output): wait for all of them.
    await eventually(lambda: len(finished()) >= TASKS, timeout=30)
    assert finished() == ["completed"] * TASKS


async def test_the_noop_worker_uses_its_own_gate(stack: Stack) -> None:
    """Its per-process gate, unlimited: the shared one of a credential no call has verified would
    let one job at a time call (and a few be claimed ahead), which a handler that never calls
    would never lift."""
    configured = await stack.wait_for_line("tts_worker", "provider_configured", 10)
    assert configured["shared_limits"] is False
