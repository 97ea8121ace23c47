"""DeleteTask through the gateway (gRPC and REST): an ended task goes with its events and its
media (its capability URL answers 404 afterwards, not 403: the link was genuine); a queued or
running task is refused; another tenant's task does not exist for the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.security.harness import TENANT_A, TOKEN_A, TOKEN_B, Charai, bearer, running_charai, tts_request


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Charai]:
    async with running_charai(Path(tmp_path_factory.mktemp("delete")), with_worker=True) as running:
        yield running


async def completed(charai: Charai, text: str) -> task_pb2.Task:
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    created = await stub.CreateTask(tts_request("char_del", text), metadata=bearer(TOKEN_A))
    async for response in stub.WatchTask(
        task_service_pb2.WatchTaskRequest(id=created.task.id), metadata=bearer(TOKEN_A), timeout=30
    ):
        if response.event.task.status == task_pb2.TASK_STATUS_COMPLETED:
            return response.event.task
    raise AssertionError("the task did not complete")


async def status_of(charai: Charai, url: str) -> int:
    async with charai.http.get(url) as resp:
        return resp.status


async def test_delete_removes_the_task_its_events_and_its_media(charai: Charai) -> None:
    if charai.worker is None:
        await charai.start_worker()
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    done = await completed(charai, "a line to delete")
    url = done.tts_result.audio_url
    assert await status_of(charai, url) == 200
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await stub.DeleteTask(task_service_pb2.DeleteTaskRequest(id=done.id), metadata=bearer(TOKEN_B))
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert await status_of(charai, url) == 200  # a refused delete removed nothing

    await stub.DeleteTask(task_service_pb2.DeleteTaskRequest(id=done.id), metadata=bearer(TOKEN_A))
    assert await status_of(charai, url) == 404
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetTask(task_service_pb2.GetTaskRequest(id=done.id), metadata=bearer(TOKEN_A))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await charai.store_events(TENANT_A, done.id) == []
    listed = await stub.ListTasks(
        task_service_pb2.ListTasksRequest(metadata={"characterId": "char_del"}), metadata=bearer(TOKEN_A)
    )
    assert done.id not in [t.id for t in listed.tasks]

    # Over REST: 204, then 404 for the task and its media.
    other = await completed(charai, "another line to delete")
    headers = {"Authorization": f"Bearer {TOKEN_A}"}
    async with charai.http.delete(f"{charai.base}/api/tasks/{other.id}", headers=headers) as resp:
        assert resp.status == 204
    async with charai.http.get(f"{charai.base}/api/tasks/{other.id}", headers=headers) as resp:
        assert resp.status == 404
    assert await status_of(charai, other.tts_result.audio_url) == 404


async def test_a_task_still_queued_or_running_is_not_deleted(charai: Charai) -> None:
    if charai.worker is not None:
        await charai.worker.close()  # nothing runs: the task stays queued
        charai.worker = None
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    created = await stub.CreateTask(tts_request("char_del", "stays queued"), metadata=bearer(TOKEN_A))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DeleteTask(
            task_service_pb2.DeleteTaskRequest(id=created.task.id), metadata=bearer(TOKEN_A)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancel it first" in (refused.value.details() or "")
    async with charai.http.delete(
        f"{charai.base}/api/tasks/{created.task.id}", headers={"Authorization": f"Bearer {TOKEN_A}"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["reason"] == "TASK_NOT_FINISHED"
    await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=created.task.id), metadata=bearer(TOKEN_A))
    await stub.DeleteTask(task_service_pb2.DeleteTaskRequest(id=created.task.id), metadata=bearer(TOKEN_A))
