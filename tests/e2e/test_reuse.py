"""Identical requests reused, through the processes ``make run`` starts and the provider emulator:
two identical TTS requests make one provider call (counted by the emulator) and complete with one
media object; ``reuse: false`` and images without a seed call the provider every time; a seeded
image is reused; removing one of two tasks sharing media leaves the other's download working."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually
from tests.e2e.helpers import collect, describe, provider_calls, unique

COMPLETED = task_pb2.TASK_STATUS_COMPLETED


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(stack.gateway_http, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def finished(client: CharaiClient, task_id: str) -> task_pb2.Task:
    events = await collect(client, task_id, timeout=60)
    task = events[-1].task
    assert task.status == COMPLETED, describe(events)
    return task


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as response:
        return response.status, await response.read()


async def rest_task(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    """POSTs a task and waits until it ended; its JSON."""
    async with http.post("/api/tasks", json=body) as response:
        created = await response.json()
        assert response.status in (200, 201), created
    task_id = created["id"]
    final: dict[str, Any] = {}

    async def ended() -> bool:
        async with http.get(f"/api/tasks/{task_id}") as response:
            final.update(await response.json())
        return final["status"] in {"completed", "failed", "cancelled"}

    await eventually(ended, timeout=60, interval=0.1)
    assert final["status"] == "completed", final
    return final


def image_body(prompt: str, seed: int | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"characterId": "char_img", "viewType": "front", "prompt": prompt}
    payload["resolution"] = "1024x1024"
    if seed is not None:
        payload["seed"] = seed
    return {"type": "image_generation", "payload": payload}


async def test_two_identical_tts_requests_make_one_provider_call_and_one_media_object(
    stack: Stack, client: CharaiClient, http: aiohttp.ClientSession
) -> None:
    text = unique("A line said twice.")
    # Submitted together: one runs, the other waits for it (its claim is deferred), then reuses.
    first = await client.create_tts("char_one", text)
    second = await client.create_tts("char_two", text)
    done = await asyncio.gather(finished(client, first.id), finished(client, second.id))
    assert await provider_calls(stack, text) == 1
    reused = [t for t in done if t.tts_result.reused]
    source = [t for t in done if not t.tts_result.reused]
    assert len(reused) == len(source) == 1, done
    assert reused[0].tts_result.reused_from_task_id == source[0].id
    urls = [t.tts_result.audio_url for t in done]
    assert urlsplit(urls[0]).path == urlsplit(urls[1]).path  # one media object
    downloads = [await fetch(http, url) for url in urls]
    assert downloads[0][0] == downloads[1][0] == 200 and downloads[0][1] == downloads[1][1]
    assert downloads[0][1][:4] == b"RIFF"
    # Its own events: started then completed at 100 %, like any task (seen over REST too).
    async with http.get(f"/api/tasks/{reused[0].id}") as response:
        body = await response.json()
    assert (body["status"], body["progress"], body["result"]["reused"]) == ("completed", 100, True)
    assert body["result"]["reusedFromTaskId"] == source[0].id
    # No provider call: metered as reused, with no call and no cost.
    usage = body["usage"]
    assert (usage["reused"], usage["provider"], usage["model"]) == (True, "zhipu", "glm-tts"), usage
    assert not usage.get("calls") and not usage.get("costUsd") and not usage.get("speechCharacters")


async def test_reuse_false_calls_the_provider_again(stack: Stack, client: CharaiClient) -> None:
    text = unique("A line said twice on purpose.")
    first = await finished(client, (await client.create_tts("char_one", text)).id)
    again = await finished(client, (await client.create_tts("char_one", text, reuse=False)).id)
    assert await provider_calls(stack, text) == 2
    assert not first.tts_result.reused and not again.tts_result.reused
    assert urlsplit(first.tts_result.audio_url).path != urlsplit(again.tts_result.audio_url).path


async def test_images_are_reused_only_with_the_same_seed(stack: Stack, http: aiohttp.ClientSession) -> None:
    prompt = unique("a knight in silver armour, front view")
    plain = [await rest_task(http, image_body(prompt, None)) for _ in range(2)]
    assert await provider_calls(stack, prompt) == 2
    assert [t["result"]["reused"] for t in plain] == [False, False]

    seeded = unique("a knight in golden armour, front view")
    one = await rest_task(http, image_body(seeded, 42))
    two = await rest_task(http, image_body(seeded, 42))
    assert two["payload"]["seed"] == 42  # a number in JSON, as sent
    assert (one["result"]["reused"], two["result"]["reused"]) == (False, True)
    assert two["result"]["reusedFromTaskId"] == one["id"]
    assert urlsplit(one["result"]["imageUrl"]).path == urlsplit(two["result"]["imageUrl"]).path
    other_seed = await rest_task(http, image_body(seeded, 43))
    assert other_seed["result"]["reused"] is False
    assert await provider_calls(stack, seeded) == 2

    async with http.post("/api/tasks", json=image_body(seeded, -1)) as response:
        refused = await response.text()
        assert response.status == 400, refused
    assert "seed" in refused


async def test_removing_one_of_two_tasks_sharing_audio_keeps_the_others_download(
    stack: Stack, client: CharaiClient, http: aiohttp.ClientSession
) -> None:
    text = unique("A line kept by its twin.")
    first = await finished(client, (await client.create_tts("char_one", text)).id)
    second = await finished(client, (await client.create_tts("char_two", text)).id)
    assert second.tts_result.reused and second.tts_result.reused_from_task_id == first.id
    audio = (await fetch(http, first.tts_result.audio_url))[1]

    async with http.delete(f"/api/tasks/{first.id}") as response:
        assert response.status == 204
    assert await fetch(http, second.tts_result.audio_url) == (200, audio)

    async with http.delete(f"/api/tasks/{second.id}") as response:
        assert response.status == 204
    assert (await fetch(http, second.tts_result.audio_url))[0] == 404  # the last one took it
    assert await provider_calls(stack, text) == 1
