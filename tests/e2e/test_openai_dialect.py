"""Both workers configured for the OpenAI dialect (``CHARAI_IMAGE_PROVIDER=openai``,
``CHARAI_TTS_PROVIDER=openai``) against the emulator speaking it (``--dialect openai``): an image
and an mp3 voice line complete through every process, the provider saw OpenAI's request shapes
(mp3 asked directly, no ``volume``), and the gateway validates against the OpenAI models' limits.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.client import CharaiClient, CharaiError
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2
from charai.tts_worker.audio import mp3_info
from PIL import Image

from tests.e2e.conftest import fast_stack
from tests.e2e.helpers import collect, emulator_stats, history, unique


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # No model or base URL set: the devstack points both workers at the emulator's /v1 and
    # every service reads the OpenAI defaults (gpt-image-1, gpt-4o-mini-tts) from the provider.
    async with fast_stack(
        tmp_path_factory, CHARAI_IMAGE_PROVIDER="openai", CHARAI_TTS_PROVIDER="openai"
    ) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(stack: Stack) -> AsyncIterator[CharaiClient]:
    async with CharaiClient(stack.gateway_grpc) as c:
        yield c


async def provider_record(stack: Stack, text: str) -> dict[str, Any]:
    """The emulator's one call-log record of the call whose prompt/input was ``text``."""
    stats = await asyncio.to_thread(emulator_stats, stack)
    records = [r for r in stats["log"] if r["text"] == text[:80]]
    assert len(records) == 1, records
    record: dict[str, Any] = records[0]
    return record


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.headers["Content-Type"]), response.read()


def assert_progress(events: list[task_pb2.TaskEvent]) -> None:
    progress = [e.task.progress for e in events]
    assert progress == sorted(progress), progress
    assert 10 in progress and 90 in progress and progress[-1] == 100
    assert any(20 <= p <= 80 for p in progress), progress
    assert events[-1].type == task_pb2.TASK_EVENT_TYPE_COMPLETED


async def test_an_image_completes_through_the_openai_dialect(client: CharaiClient, stack: Stack) -> None:
    prompt = unique("a knight in silver armour, front view")
    task = await client.create_image(
        "char_oai_img", prompt, resolution="1536x1024", quality="high", output_format="webp"
    )
    assert task.image.quality == "high" and task.image.output_format == "webp"
    await collect(client, task.id)
    events = await history(client, task.id)
    assert_progress(events)
    result = events[-1].task.image_result
    assert (result.width, result.height, result.content_type) == (1536, 1024, "image/webp")
    content_type, data = await asyncio.to_thread(fetch, result.image_url)
    assert content_type == "image/webp" and len(data) == result.size_bytes
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("WEBP", (1536, 1024))

    record = await provider_record(stack, prompt)
    assert (record["dialect"], record["route"], record["status"]) == (
        "openai",
        "openai.images.generations",
        200,
    )
    assert (record["model"], record["size"], record["n"]) == ("gpt-image-1", "1536x1024", 1)
    assert (record["quality"], record["output_format"]) == ("high", "webp")


async def test_an_mp3_voice_line_is_asked_as_mp3_without_volume(client: CharaiClient, stack: Stack) -> None:
    text = unique("Hello there, traveller. The road north is long.")
    task = await client.create_tts(
        "char_oai_tts", text, voice_style="nova", response_format="mp3", volume=1.0
    )
    await collect(client, task.id)
    events = await history(client, task.id)
    assert_progress(events)
    result = events[-1].task.tts_result
    assert (result.content_type, result.voice_style) == ("audio/mpeg", "nova")
    content_type, data = await asyncio.to_thread(fetch, result.audio_url)
    assert content_type == "audio/mpeg" and len(data) == result.size_bytes
    info = mp3_info(data)
    assert info.sample_rate == 24000
    assert result.duration_seconds == pytest.approx(info.duration_seconds, abs=0.2)

    record = await provider_record(stack, text)
    assert (record["dialect"], record["route"], record["model"]) == (
        "openai",
        "openai.audio.speech",
        "gpt-4o-mini-tts",
    )
    # mp3 asked of the provider (no local encode), and a 200: the emulator, like OpenAI, refuses
    # a request carrying Zhipu's ``volume`` with a 400 (test_the_emulator_refuses_volume).
    assert (record["response_format"], record["voice"], record["status"]) == ("mp3", "nova", 200)
    assert "volume" not in record
    assert record["audio_seconds"] == pytest.approx(info.duration_seconds, abs=0.2)


async def test_a_volume_is_applied_by_the_worker(client: CharaiClient, stack: Stack) -> None:
    text = unique("A quieter line.")
    task = await client.create_tts(
        "char_oai_tts", text, voice_style="alloy", response_format="mp3", volume=0.5
    )
    events = await collect(client, task.id)
    assert events[-1].task.status == task_pb2.TASK_STATUS_COMPLETED, events[-1].task.error
    record = await provider_record(stack, text)
    assert (record["response_format"], record["status"]) == ("wav", 200)  # samples to scale, then mp3


async def test_requests_are_validated_against_the_openai_models(client: CharaiClient, stack: Stack) -> None:
    with pytest.raises(CharaiError) as caught:
        await client.create_image("char_oai_bad", "a gate", resolution="1280x1280", quality="hd")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    fields = dict(caught.value.fields)
    assert "gpt-image-1" in fields["image.resolution"] and "1536x1024" in fields["image.resolution"]
    assert "low, medium, high, auto" in fields["image.quality"]

    with pytest.raises(CharaiError) as caught:
        await client.create_tts("char_oai_bad", "x" * 4097, voice_style="tongtong")
    fields = dict(caught.value.fields)
    assert "4096" in fields["tts.text"] and "alloy" in fields["tts.voice_style"]

    # The REST route takes the new fields in the seed's camelCase and names them when bad.
    body = {
        "type": "image_generation",
        "payload": {
            "characterId": "char_oai_bad",
            "prompt": "a gate",
            "quality": "low",
            "outputFormat": "gif",
        },
    }
    async with (
        aiohttp.ClientSession(stack.gateway_http) as http,
        http.post("/api/tasks", json=body) as response,
    ):
        assert response.status == 400
        text = await response.text()
    assert "outputFormat" in text and "png, jpeg, webp" in text
