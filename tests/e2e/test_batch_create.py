"""BatchCreateTasks through the stack: a character's whole sheet in one call, all or none.

gRPC (the Python client), REST (``POST /api/tasks:batchCreate``) and an access token's scope.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from charai.client import CharaiClient
from charai.client.client import CharaiError
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import json_format

from tests.conftest import eventually

COMPLETED = task_pb2.TASK_STATUS_COMPLETED


def view(character: str, kind: str, request_id: str = "") -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        image=task_pb2.ImagePayload(
            character_id=character, prompt=f"a young swordsman, {kind} view", view_type=kind
        ),
        request_id=request_id,
    )


def line(character: str, request_id: str = "") -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(character_id=character, text="Hello, I am Li Ming.", voice_style="tongtong"),
        request_id=request_id,
    )


def sheet(character: str, ids: bool = False) -> list[task_service_pb2.CreateTaskRequest]:
    def rid(n: int) -> str:
        return f"{character}-{n}" if ids else ""

    return [
        view(character, "front", rid(0)),
        view(character, "side", rid(1)),
        view(character, "back", rid(2)),
        line(character, rid(3)),
    ]


async def listed(client: CharaiClient, character: str) -> list[task_pb2.Task]:
    return [t async for t in client.list({"characterId": character})]


async def test_a_character_sheet_in_one_call_answers_in_order_and_completes(client: CharaiClient) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    tasks = await client.create_many(sheet(character))
    assert [t.image.view_type or "voice" for t in tasks] == ["front", "side", "back", "voice"]
    assert all(
        t.status == task_pb2.TASK_STATUS_QUEUED and t.metadata["characterId"] == character for t in tasks
    )
    assert len({t.id for t in tasks}) == 4

    async def all_completed() -> bool:
        return all(t.status == COMPLETED for t in await listed(client, character))

    await eventually(all_completed, timeout=90, interval=0.2)


async def test_a_retried_batch_returns_the_same_tasks(client: CharaiClient) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    first = await client.create_many(sheet(character, ids=True))
    again = await client.create_many(sheet(character, ids=True))
    assert [t.id for t in again] == [t.id for t in first]
    assert len(await listed(client, character)) == 4


async def test_one_bad_request_refuses_the_whole_batch_naming_it(client: CharaiClient) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    requests = sheet(character)
    requests[2].image.prompt = ""
    requests[3].tts.voice_style = ""
    with pytest.raises(CharaiError) as caught:
        await client.create_many(requests)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in caught.value.fields}
    assert fields == {"requests[2].image.prompt", "requests[3].tts.voice_style"}, fields
    assert await listed(client, character) == []  # nothing stored

    for count in (0, 101):
        with pytest.raises(CharaiError) as caught:
            await client.create_many([line(character)] * count)
        assert [field for field, _ in caught.value.fields] == ["requests"]


def largest(character: str, n: int) -> task_service_pb2.CreateTaskRequest:
    """An image request near every size limit: a 4,000-character prompt of 15,970 bytes and 14
    metadata entries of 500 characters."""
    request = view(character, "front")
    request.image.prompt = "\U0001f5e1" * 3990 + f"{n:010d}"
    for k in range(14):
        request.metadata[f"k{k:02d}"] = "v" * 500
    return request


async def test_requests_at_their_largest_are_taken_in_a_full_batch_and_all_at_once(
    client: CharaiClient,
) -> None:
    """A batch of 100 such requests is 2.3 MB: over the 1 MiB gRPC took before, it was refused
    with no details. 60 such creates at once: the gateway coalesced them into one store call
    over task_store's limit, and every create of it failed RESOURCE_EXHAUSTED."""
    character = f"char_{uuid.uuid4().hex[:8]}"
    requests = [largest(character, n) for n in range(100)]
    assert sum(r.ByteSize() for r in requests) > 2 * 1024 * 1024
    batch = await client.create_many(requests)
    assert [t.image.prompt[-10:] for t in batch] == [f"{n:010d}" for n in range(100)]
    singles = await asyncio.gather(*(client.create(largest(character, 100 + n)) for n in range(60)))
    assert all(t.status == task_pb2.TASK_STATUS_QUEUED for t in batch + singles)
    assert len({t.id for t in batch + singles}) == 160
    # Out of the way of the module's other tests (they share the tenant's fair share).
    await asyncio.gather(*(client.cancel(t.id) for t in batch + singles))


async def test_rest_batch_create(stack: Stack, client: CharaiClient) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    payload = {"characterId": character, "text": "Hi.", "voiceStyle": "tongtong"}
    item: dict[str, Any] = {"type": "tts_generation", "payload": payload}
    url = f"{stack.gateway_http}/api/tasks:batchCreate"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"requests": [item, {**item, "priority": "high"}]}) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert [t["priority"] for t in body["tasks"]] == ["normal", "high"]
        assert all(t["status"] == "queued" for t in body["tasks"])
        bad = {"requests": [item, {**item, "payload": {**payload, "text": ""}}, {"type": "x"}]}
        async with http.post(url, json=bad) as response:
            assert response.status == 400
            error = await response.json()
    text = str(error)
    assert "requests[2].type" in text and "requests[2].payload" in text, text
    assert len(await listed(client, character)) == 2  # only the first batch


async def test_an_access_token_creates_a_batch_only_inside_its_scope(
    stack: Stack, client: CharaiClient
) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    issued = await client._stub.CreateAccessToken(
        task_service_pb2.CreateAccessTokenRequest(metadata={"characterId": character}, allow_create=True)
    )
    async with CharaiClient(stack.gateway_grpc, token=issued.token) as browser:
        tasks = await browser.create_many([line(character), view(character, "front")])
        assert len(tasks) == 2
        with pytest.raises(CharaiError) as caught:
            await browser.create_many([line(character), line("someone_else")])
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert len(await listed(client, character)) == 2  # the refused batch stored nothing


async def test_the_cli_submits_a_batch_file(stack: Stack, client: CharaiClient, tmp_path: Path) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    batch = task_service_pb2.BatchCreateTasksRequest(requests=sheet(character))
    path = tmp_path / "sheet.json"
    path.write_text(json_format.MessageToJson(batch))
    run = [sys.executable, "-m", "charai.client.cli", "--target", stack.gateway_grpc, "batch"]
    process = await asyncio.create_subprocess_exec(*run, str(path), stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0
    ids = out.decode().split()  # one id per line, in request order
    assert len(ids) == 4 and sorted(ids) == sorted(t.id for t in await listed(client, character))
    assert [(await client.get(i)).image.view_type for i in ids] == ["front", "side", "back", ""]
    path.write_text('{"requests": [{"type": "TASK_TYPE_TTS_GENERATION", "tts": {"text": ""}}]}')
    process = await asyncio.create_subprocess_exec(
        *run, str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 3 and b"requests[0].tts.text" in err, err
