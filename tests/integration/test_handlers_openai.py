"""The image and TTS handlers in the OpenAI dialect against the real emulator (``--dialect
openai``) over real HTTP, and the error-classification suite run against both dialects.

The Zhipu-only paths (GLM-Image's async endpoint, JSON-wrapped audio) are in test_handlers.py;
the helpers (a recording JobContext, the progress shape) are shared from there.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.states import Stage
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.emulator.media import PNG_SIGNATURE, png_size
from charai.image_worker import ImageHandler
from charai.tasks.v1 import task_pb2
from charai.tts_worker import TtsHandler
from charai.tts_worker.audio import mp3_info, wav_to_pcm
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError

from tests.integration.test_handlers import TEXT, RecordingContext, assert_progress_shape, expected_seconds

BOTH = EmulatorConfig(latency_min=0, latency_max=0.01, dialects=frozenset({"zhipu", "openai"}))
DIALECTS = ["zhipu", "openai"]
#: The model each dialect's suite uses: (image, TTS).
MODELS = {"zhipu": ("cogview-4", "glm-tts"), "openai": ("gpt-image-1", "gpt-4o-mini-tts")}


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator(BOTH) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def provider(
    session: aiohttp.ClientSession,
    emu: RunningEmulator,
    model: str,
    dialect: str = "openai",
    *,
    api_key: str = "test-key",
    key_setting: str = "CHARAI_IMAGE_API_KEY",
    timeout: float = 10.0,
) -> ProviderHttp:
    config = ProviderConfig(
        base_url=emu.openai_base if dialect == "openai" else emu.api_base,
        api_key=api_key,
        model=model,
        key_setting=key_setting,
        dialect=dialect,
        allow_private_urls=True,
        timeout=timeout,
    )
    return ProviderHttp(session, config)


def image_ctx(http: ProviderHttp, prompt: str, **fields: Any) -> RecordingContext:
    payload = task_pb2.ImagePayload(character_id="char_001", prompt=prompt, view_type="front", **fields)
    task = task_pb2.Task(id="task-img-1", type=task_pb2.TASK_TYPE_IMAGE_GENERATION, image=payload, attempt=1)
    return RecordingContext(task, http)


def tts_ctx(http: ProviderHttp, text: str, response_format: str = "", **fields: Any) -> RecordingContext:
    payload = task_pb2.TtsPayload(
        character_id="char_001", text=text, response_format=response_format, **fields
    )
    task = task_pb2.Task(id="task-tts-1", type=task_pb2.TASK_TYPE_TTS_GENERATION, tts=payload, attempt=1)
    return RecordingContext(task, http)


def calls(emu: RunningEmulator) -> list[dict[str, Any]]:
    """The emulator's call log: one record per generation call it answered."""
    log: list[dict[str, Any]] = emu.stats()["log"]
    return log


# =========================================================================== images


async def test_gpt_image_is_asked_without_response_format_and_answers_b64(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = image_ctx(provider(session, emu, "gpt-image-1"), "a knight in silver armour")
    result = await ImageHandler().run(ctx)

    [(key, (data, content_type))] = ctx.media.items()
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == (1024, 1024)
    assert (key, content_type) == ("task-img-1.png", "image/png")
    assert (result.resolution, result.width, result.height) == ("1024x1024", 1024, 1024)
    assert result.size_bytes == len(data)
    assert_progress_shape(ctx)
    [call] = calls(emu)
    assert (call["dialect"], call["model"], call["size"], call["n"]) == (
        "openai",
        "gpt-image-1",
        "1024x1024",
        1,
    )
    # The log shows the effective answer format; the emulator refuses ``response_format`` for a
    # GPT image model with a 400 (test_the_emulator_refuses_response_format_for_gpt_image), so
    # a 200 proves the worker did not send it.
    assert (call["response_format"], call["status"]) == ("b64_json", 200)
    assert emu.stats()["calls"].get("files", 0) == 0


async def test_the_emulator_refuses_response_format_for_gpt_image(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-image-1", "prompt": "x", "response_format": "b64_json"}
    async with session.post(f"{emu.openai_base}/images/generations", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    ("output_format", "content_type", "extension"),
    [("webp", "image/webp", "webp"), ("jpeg", "image/jpeg", "jpg"), ("png", "image/png", "png")],
)
async def test_gpt_image_quality_and_output_format_are_sent(
    emu: RunningEmulator,
    session: aiohttp.ClientSession,
    output_format: str,
    content_type: str,
    extension: str,
) -> None:
    ctx = image_ctx(
        provider(session, emu, "gpt-image-1"),
        "a red fox",
        resolution="1536x1024",
        quality="high",
        output_format=output_format,
    )
    result = await ImageHandler().run(ctx)
    assert (result.content_type, result.width, result.height) == (content_type, 1536, 1024)
    assert list(ctx.media) == [f"task-img-1.{extension}"]
    [call] = calls(emu)
    assert (call["quality"], call["output_format"], call["size"]) == ("high", output_format, "1536x1024")


async def test_gpt_image_auto_size(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = image_ctx(provider(session, emu, "gpt-image-1"), "a harbour", resolution="auto")
    result = await ImageHandler().run(ctx)
    [(data, _)] = ctx.media.values()
    assert result.resolution == f"{result.width}x{result.height}"
    assert png_size(data) == (result.width, result.height)
    assert calls(emu)[0]["size"] == "auto"


@pytest.mark.parametrize(("model", "size"), [("dall-e-2", "256x256"), ("dall-e-3", "1792x1024")])
async def test_dalle_is_asked_for_b64_json(
    emu: RunningEmulator, session: aiohttp.ClientSession, model: str, size: str
) -> None:
    ctx = image_ctx(provider(session, emu, model), "a lighthouse", resolution=size)
    result = await ImageHandler().run(ctx)
    assert result.resolution == size
    [call] = calls(emu)
    assert (call["model"], call["response_format"], call["status"]) == (model, "b64_json", 200)
    assert emu.stats()["calls"].get("files", 0) == 0


async def test_dalle_url_answer_is_downloaded_at_once(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = image_ctx(provider(session, emu, "dall-e-3"), "a castle", resolution="1024x1024", quality="hd")
    result = await ImageHandler(response_format="url").run(ctx)
    [(data, _)] = ctx.media.values()
    assert png_size(data) == (1024, 1024)
    assert result.image_url == "charai-media:task-img-1.png"  # charai's URL, not the provider's
    [call] = calls(emu)
    assert (call["response_format"], call["quality"]) == ("url", "hd")
    assert emu.stats()["calls"]["files"] == 1


async def test_openai_image_never_uses_an_async_endpoint(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    # glm-image is the async model in Zhipu's dialect; an OpenAI-compatible server of that name
    # is still called synchronously (the emulator refuses the model, as OpenAI would).
    ctx = image_ctx(provider(session, emu, "glm-image"), "a tower")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler(async_mode="async").run(ctx)
    assert caught.value.failure.kind is ErrorKind.INVALID_REQUEST
    assert [call["route"] for call in calls(emu)] == ["openai.images.generations"]


# =========================================================================== TTS


@pytest.mark.parametrize("response_format", ["mp3", "wav", "pcm"])
async def test_speech_is_asked_in_the_wanted_format_without_volume(
    emu: RunningEmulator, session: aiohttp.ClientSession, response_format: str
) -> None:
    http = provider(session, emu, "gpt-4o-mini-tts", key_setting="CHARAI_TTS_API_KEY")
    ctx = tts_ctx(http, TEXT, response_format, voice_style="nova", speed=1.0, volume=1.0)
    result = await TtsHandler().run(ctx)

    [(key, (data, content_type))] = ctx.media.items()
    assert key == f"task-tts-1.{response_format}"
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT), rel=0.05)
    if response_format == "mp3":
        assert content_type == "audio/mpeg"
        assert mp3_info(data).sample_rate == 24000
    elif response_format == "wav":
        assert content_type == "audio/wav"
        assert wav_to_pcm(data)[1:] == (24000, 1, 2)
    else:
        assert content_type == "audio/L16;rate=24000;channels=1"
        assert len(data) / 48000 == pytest.approx(result.duration_seconds)
    assert (result.voice_style, result.text) == ("nova", TEXT)
    assert_progress_shape(ctx)
    [call] = calls(emu)
    # The emulator refuses unknown arguments such as Zhipu's ``volume`` with a 400: a 200 here
    # proves the request carried none (test_the_emulator_refuses_volume).
    assert (call["response_format"], call["voice"], call["status"]) == (response_format, "nova", 200)


async def test_the_emulator_refuses_volume(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    """The proof the tests above rest on: OpenAI's speech route (and the emulator's) refuses
    ``volume``, so a 200 means the worker did not send it."""
    body = {"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy", "volume": 1.0}
    async with session.post(f"{emu.openai_base}/audio/speech", json=body) as response:
        assert response.status == 400
        assert "volume" in (await response.json())["error"]["message"]


async def test_volume_is_applied_to_the_samples(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    http = provider(session, emu, "gpt-4o-mini-tts", key_setting="CHARAI_TTS_API_KEY")
    plain = tts_ctx(http, TEXT, "pcm")
    await TtsHandler().run(plain)
    quiet = tts_ctx(http, TEXT, "pcm", volume=0.5)
    quiet.task.id = "task-tts-2"
    await TtsHandler().run(quiet)
    [(original, _)] = plain.media.values()
    [(scaled, _)] = quiet.media.values()
    before, after = array.array("h", original), array.array("h", scaled)
    assert len(before) == len(after) and any(before)
    assert list(after) == [round(v * 0.5) for v in before]
    first, second = calls(emu)
    # Without a gain the wanted pcm is asked directly; with one, wav (samples with their rate).
    assert (first["response_format"], second["response_format"]) == ("pcm", "wav")
    assert second["status"] == 200


async def test_volume_with_mp3_is_encoded_here(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    http = provider(session, emu, "gpt-4o-mini-tts", key_setting="CHARAI_TTS_API_KEY")
    ctx = tts_ctx(http, TEXT, "mp3", voice_style="alloy", volume=2.0)
    result = await TtsHandler().run(ctx)
    [(data, content_type)] = ctx.media.values()
    assert content_type == "audio/mpeg"
    assert mp3_info(data).sample_rate == 24000
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT), rel=0.05)
    assert calls(emu)[0]["response_format"] == "wav"


async def test_speech_without_a_voice_uses_alloy(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu, "tts-1", key_setting="CHARAI_TTS_API_KEY")
    result = await TtsHandler().run(tts_ctx(http, "Hello.", "wav"))
    assert result.voice_style == "alloy"
    assert calls(emu)[0]["voice"] == "alloy"


# =========================================================================== errors, both dialects

#: (marker, kind per dialect); one row per failure the provider can answer with.
FAILURES: list[tuple[str, dict[str, ErrorKind]]] = [
    ("[[auth]]", {"zhipu": ErrorKind.PROVIDER_AUTH, "openai": ErrorKind.PROVIDER_AUTH}),
    ("[[forbidden]]", {"zhipu": ErrorKind.PROVIDER_AUTH, "openai": ErrorKind.PROVIDER_AUTH}),
    ("[[content]]", {"zhipu": ErrorKind.CONTENT_REJECTED, "openai": ErrorKind.CONTENT_REJECTED}),
    ("[[invalid]]", {"zhipu": ErrorKind.INVALID_REQUEST, "openai": ErrorKind.INVALID_REQUEST}),
    ("[[model]]", {"zhipu": ErrorKind.INVALID_REQUEST, "openai": ErrorKind.INVALID_REQUEST}),
    ("[[too-long]]", {"zhipu": ErrorKind.INVALID_REQUEST, "openai": ErrorKind.INVALID_REQUEST}),
    ("[[quota]]", {"zhipu": ErrorKind.QUOTA_EXHAUSTED, "openai": ErrorKind.QUOTA_EXHAUSTED}),
    # Zhipu's 1305 "overloaded" is a 429 (rate limit); OpenAI's is a 503 (server trouble).
    ("[[overload]]", {"zhipu": ErrorKind.RATE_LIMITED, "openai": ErrorKind.PROVIDER_UNAVAILABLE}),
    ("[[server]]", {"zhipu": ErrorKind.PROVIDER_UNAVAILABLE, "openai": ErrorKind.PROVIDER_UNAVAILABLE}),
    ("[[truncated]]", {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE}),
    ("[[garbage]]", {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE}),
    ("[[wrong-type]]", {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE}),
    ("[[redirect]]", {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE}),
    (
        "[[json-error-200]]",
        {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE},
    ),
]
#: Where each marker only makes sense for images (base64 image bodies).
IMAGE_ONLY = [
    ("[[bad-b64]]", {"zhipu": ErrorKind.PROVIDER_BAD_RESPONSE, "openai": ErrorKind.PROVIDER_BAD_RESPONSE})
]


async def fail_image(
    emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str, marker: str
) -> ProviderError:
    ctx = image_ctx(provider(session, emu, MODELS[dialect][0], dialect), f"a castle {marker}")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler(async_mode="sync").run(ctx)
    assert ctx.media == {}
    assert (90, Stage.PROCESSING) not in ctx.progress_calls
    return caught.value


async def fail_speech(
    emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str, marker: str
) -> ProviderError:
    http = provider(session, emu, MODELS[dialect][1], dialect, key_setting="CHARAI_TTS_API_KEY")
    ctx = tts_ctx(http, f"Good morning. {marker}", "mp3", voice_style="alloy" if dialect == "openai" else "")
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert ctx.media == {}
    return caught.value


@pytest.mark.parametrize(("marker", "kinds"), FAILURES + IMAGE_ONLY)
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_image_errors_are_classified(
    emu: RunningEmulator,
    session: aiohttp.ClientSession,
    dialect: str,
    marker: str,
    kinds: dict[str, ErrorKind],
) -> None:
    error = await fail_image(emu, session, dialect, marker)
    assert error.failure.kind is kinds[dialect], error.failure
    assert [call["dialect"] for call in calls(emu)] == [dialect]


@pytest.mark.parametrize(("marker", "kinds"), FAILURES)
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_speech_errors_are_classified(
    emu: RunningEmulator,
    session: aiohttp.ClientSession,
    dialect: str,
    marker: str,
    kinds: dict[str, ErrorKind],
) -> None:
    error = await fail_speech(emu, session, dialect, marker)
    assert error.failure.kind is kinds[dialect], error.failure
    assert [call["dialect"] for call in calls(emu)] == [dialect]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_provider_messages_and_codes_are_kept(
    emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str
) -> None:
    content = (await fail_image(emu, session, dialect, "[[content]]")).failure
    quota = (await fail_speech(emu, session, dialect, "[[quota]]")).failure
    auth = (await fail_speech(emu, session, dialect, "[[auth]]")).failure
    if dialect == "openai":
        assert (content.provider_code, content.http_status) == ("content_policy_violation", 400)
        assert "safety system" in content.message
        assert (quota.provider_code, quota.http_status) == ("insufficient_quota", 429)
        assert "exceeded your current quota" in quota.message
        assert auth.provider_code == "invalid_api_key"
    else:
        assert (content.provider_code, quota.provider_code, auth.provider_code) == ("1301", "1113", "1000")
    assert "CHARAI_TTS_API_KEY" in auth.message
    assert not content.retryable and not quota.retryable and not auth.retryable


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_rate_limits_carry_retry_after(
    emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str
) -> None:
    # Retry-After 6 is over the 5 s a call waits inside its attempt: the error reaches the store.
    image = (await fail_image(emu, session, dialect, "[[rate:6]]")).failure
    speech = (await fail_speech(emu, session, dialect, "[[rate:6]]")).failure
    for failure in (image, speech):
        assert failure.kind is ErrorKind.RATE_LIMITED
        assert failure.retry_after == 6
        assert failure.retryable
    assert image.provider_code == ("rate_limit_exceeded" if dialect == "openai" else "1302")


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_short_rate_limit_is_retried_inside_the_attempt(
    emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str
) -> None:
    ctx = image_ctx(provider(session, emu, MODELS[dialect][0], dialect), "a storm [[rate*1:0.05]]")
    result = await ImageHandler(async_mode="sync").run(ctx)
    assert result.width == 1024
    assert [call["status"] for call in calls(emu)] == [429, 200]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_hang_times_out(emu: RunningEmulator, session: aiohttp.ClientSession, dialect: str) -> None:
    http = provider(session, emu, MODELS[dialect][1], dialect, timeout=0.3)
    ctx = tts_ctx(http, "Wait for it [[hang:5]]", "wav", voice_style="alloy")
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_wrong_key_is_an_auth_failure_naming_the_setting(
    session: aiohttp.ClientSession, dialect: str
) -> None:
    async with running_emulator(dataclasses.replace(BOTH, api_key="the-right-key")) as emu:
        wrong = provider(session, emu, MODELS[dialect][0], dialect, api_key="wrong")
        with pytest.raises(ProviderError) as caught:
            await ImageHandler(async_mode="sync").run(image_ctx(wrong, "a gate"))
        assert caught.value.failure.kind is ErrorKind.PROVIDER_AUTH
        assert "CHARAI_IMAGE_API_KEY" in caught.value.failure.message
        assert "wrong" not in caught.value.failure.message

        right = provider(session, emu, MODELS[dialect][0], dialect, api_key="the-right-key")
        result = await ImageHandler(async_mode="sync").run(image_ctx(right, "a gate"))
        assert result.width == 1024
