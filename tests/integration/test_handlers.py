"""The image and TTS handlers against the real provider emulator over real HTTP.

The JobContext here is a small recording stand-in (progress calls and stored bytes kept in
memory): these tests are about what a handler does with the provider's answers; the runtime that
really reports progress and stores media is tested elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import itertools
import struct
import wave
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from charai.core.domain.errors import ErrorKind
from charai.core.domain.states import Stage
from charai.core.domain.usage import Metered
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.emulator.media import PNG_SIGNATURE, audio_seconds, make_png, png_size
from charai.emulator.modes import strip_markers
from charai.image_worker import ImageHandler
from charai.tasks.v1 import task_pb2
from charai.tts_worker import TtsHandler
from charai.tts_worker.audio import mp3_info, wav_info
from charai.worker.context import MediaRef
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError
from PIL import Image

FAST = EmulatorConfig(latency_min=0, latency_max=0.01)


@dataclasses.dataclass
class RecordingContext:
    """A JobContext that records what the handler reports and stores."""

    task: task_pb2.Task
    provider: ProviderHttp
    attempt: int = 1
    progress_calls: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    media: dict[str, tuple[bytes, str]] = dataclasses.field(default_factory=dict)
    metered: list[Metered] = dataclasses.field(default_factory=list)

    async def progress(self, percent: int, stage: str = Stage.GENERATING) -> None:
        self.progress_calls.append((percent, stage))

    def meter(self, usage: Metered) -> None:
        self.metered.append(usage)

    async def store_media(self, data: bytes, extension: str, content_type: str) -> MediaRef:
        key = f"{self.task.id}.{extension}"
        self.media[key] = (data, content_type)
        return MediaRef(key, len(data), content_type)

    @property
    def percents(self) -> list[int]:
        return [percent for percent, _ in self.progress_calls]


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator(FAST) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def make_provider(
    session: aiohttp.ClientSession,
    emu: RunningEmulator,
    model: str,
    *,
    timeout: float = 10.0,
    api_key: str = "test-key",
    key_setting: str = "CHARAI_IMAGE_API_KEY",
    max_body_bytes: int = 32 * 1024 * 1024,
) -> ProviderHttp:
    config = ProviderConfig(
        base_url=emu.api_base,
        api_key=api_key,
        model=model,
        key_setting=key_setting,
        allow_private_urls=True,
        timeout=timeout,
        max_body_bytes=max_body_bytes,
    )
    return ProviderHttp(session, config)


def image_ctx(provider: ProviderHttp, prompt: str, resolution: str = "") -> RecordingContext:
    payload = task_pb2.ImagePayload(
        character_id="char_001",
        character_name="Aria",
        prompt=prompt,
        resolution=resolution,
        view_type="front",
    )
    task = task_pb2.Task(id="task-img-1", type=task_pb2.TASK_TYPE_IMAGE_GENERATION, image=payload, attempt=1)
    return RecordingContext(task, provider)


def tts_ctx(
    provider: ProviderHttp, text: str, response_format: str = "", speed: float | None = None
) -> RecordingContext:
    payload = task_pb2.TtsPayload(
        character_id="char_001", character_name="Aria", text=text, voice_style="tongtong"
    )
    payload.response_format = response_format
    if speed is not None:
        payload.speed = speed
    task = task_pb2.Task(id="task-tts-1", type=task_pb2.TASK_TYPE_TTS_GENERATION, tts=payload, attempt=1)
    return RecordingContext(task, provider)


def assert_progress_shape(ctx: RecordingContext) -> None:
    """20 first, increasing, inside the call's 20..80 band, then 90 processing last."""
    calls = ctx.progress_calls
    assert calls[0] == (20, Stage.GENERATING)
    assert calls[-1] == (90, Stage.PROCESSING)
    middle = [p for p, stage in calls[:-1]]
    assert all(20 <= p <= 80 for p in middle)
    assert middle == sorted(set(middle))


# =========================================================================== images


async def test_sync_image_is_a_png_of_the_requested_size(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = image_ctx(make_provider(session, emu, "cogview-4"), "a knight in silver armour", "768x1344")
    result = await ImageHandler().run(ctx)

    [(key, (data, content_type))] = ctx.media.items()
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == (768, 1344)
    assert content_type == "image/png"
    assert key == "task-img-1.png"
    assert result.image_url == "charai-media:task-img-1.png"
    assert result.prompt == "a knight in silver armour"
    assert (result.resolution, result.width, result.height) == ("768x1344", 768, 1344)
    assert result.content_type == "image/png"
    assert result.size_bytes == len(data)
    assert result.generated_at.seconds > 0
    assert_progress_shape(ctx)
    stats = emu.stats()
    assert stats["calls"]["images.generations"] == 1
    assert stats["calls"]["files"] == 1  # the temporary URL was copied, not passed on


@pytest.mark.parametrize(("model", "size"), [("cogview-4", (1024, 1024)), ("glm-image", (1280, 1280))])
async def test_sync_image_default_size_per_model(
    emu: RunningEmulator, session: aiohttp.ClientSession, model: str, size: tuple[int, int]
) -> None:
    ctx = image_ctx(make_provider(session, emu, model), "a quiet harbour")
    result = await ImageHandler(async_mode="sync").run(ctx)
    assert (result.width, result.height) == size
    assert emu.stats()["calls"]["async.images.generations"] == 0


async def test_b64_image(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = image_ctx(make_provider(session, emu, "cogview-4"), "a red fox", "1024x1024")
    result = await ImageHandler(response_format="b64_json").run(ctx)
    [(data, _)] = ctx.media.values()
    assert png_size(data) == (1024, 1024)
    assert result.size_bytes == len(data)
    assert emu.stats()["calls"]["files"] == 0


@pytest.mark.parametrize("async_mode", ["auto", "async"])
async def test_async_glm_image_polls_with_rising_progress(
    emu: RunningEmulator, session: aiohttp.ClientSession, async_mode: str
) -> None:
    ctx = image_ctx(make_provider(session, emu, "glm-image"), "a lighthouse at dusk", "1568x1056")
    handler = ImageHandler(async_mode=async_mode, poll_interval=0.01, expected_seconds=15.0)
    result = await handler.run(ctx)

    assert (result.width, result.height) == (1568, 1056)
    [(data, _)] = ctx.media.values()
    assert png_size(data) == (1568, 1056)
    stats = emu.stats()
    assert stats["calls"]["async.images.generations"] == 1
    assert stats["calls"]["images.generations"] == 0
    polls = stats["calls"]["async-result"]
    assert polls >= FAST.async_poll_steps + 1
    assert stats["tasks"]["succeeded"] == 1
    # One rising report per poll, strictly increasing, inside 20..80, then 90.
    assert_progress_shape(ctx)
    generating = [p for p, stage in ctx.progress_calls if stage == Stage.GENERATING]
    assert len(generating) == 1 + polls
    assert all(a < b for a, b in itertools.pairwise(generating))
    assert max(generating) < 80


async def test_async_progress_stays_below_80_over_many_polls(session: aiohttp.ClientSession) -> None:
    config = dataclasses.replace(FAST, async_poll_steps=120)
    async with running_emulator(config) as emu:
        ctx = image_ctx(make_provider(session, emu, "glm-image"), "a slow painting")
        await ImageHandler(poll_interval=0.001, expected_seconds=0.05).run(ctx)
    generating = [p for p, stage in ctx.progress_calls if stage == Stage.GENERATING]
    assert generating[0] == 20
    assert all(a < b for a, b in itertools.pairwise(generating))
    assert generating[-1] == 79


async def test_image_payload_prompt_reaches_provider_unchanged(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    prompt = "蓝色的龙 / a blue dragon ✨"
    ctx = image_ctx(make_provider(session, emu, "cogview-4"), prompt)
    result = await ImageHandler().run(ctx)
    assert result.prompt == prompt
    assert emu.stats()["by_text"] == {prompt: 1}


IMAGE_FAILURES = [
    ("[[content]]", ErrorKind.CONTENT_REJECTED),
    ("[[server]]", ErrorKind.PROVIDER_UNAVAILABLE),
    ("[[zhipu-500]]", ErrorKind.PROVIDER_UNAVAILABLE),
    ("[[quota]]", ErrorKind.QUOTA_EXHAUSTED),
    ("[[overload]]", ErrorKind.RATE_LIMITED),
    ("[[invalid]]", ErrorKind.INVALID_REQUEST),
    ("[[truncated]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[bad-b64]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[wrong-type]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[garbage]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[redirect]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    # A 200 carrying {"error": ...} is a bad response whatever its code (DESIGN.md section 4).
    ("[[json-error-200:9999]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200:1302]]", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200:1214]]", ErrorKind.PROVIDER_BAD_RESPONSE),
]

#: The failures after which the call is charged (metered): the answer named a picture (the
#: provider made it), which then was not an image or whose base64 was broken. An answer that
#: cannot be read (truncated JSON, not JSON) names nothing.
IMAGE_CHARGED = {"[[bad-b64]]", "[[garbage]]"}


@pytest.mark.parametrize(("marker", "kind"), IMAGE_FAILURES)
@pytest.mark.parametrize("route", ["cogview-4/sync", "glm-image/async"])
async def test_image_failure_modes(
    emu: RunningEmulator, session: aiohttp.ClientSession, marker: str, kind: ErrorKind, route: str
) -> None:
    model, async_mode = route.split("/")
    ctx = image_ctx(make_provider(session, emu, model), f"a castle {marker}")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler(async_mode=async_mode, poll_interval=0.01).run(ctx)
    assert caught.value.failure.kind is kind, caught.value.failure
    assert ctx.media == {}
    assert (90, Stage.PROCESSING) not in ctx.progress_calls
    assert len(ctx.metered) == (marker in IMAGE_CHARGED), ctx.metered


async def test_image_failure_reasons_are_specific(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    async def reason(marker: str) -> str:
        ctx = image_ctx(make_provider(session, emu, "cogview-4"), f"a tower {marker}")
        with pytest.raises(ProviderError) as caught:
            await ImageHandler().run(ctx)
        return caught.value.failure.message

    assert "not a PNG, JPEG or WebP" in await reason("[[garbage]]")
    assert "base64" in await reason("[[bad-b64]]")
    assert "JSON" in await reason("[[wrong-type]]")


async def test_content_rejection_keeps_provider_message(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = image_ctx(make_provider(session, emu, "glm-image"), "something [[content]]")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler(poll_interval=0.01).run(ctx)
    failure = caught.value.failure
    assert failure.provider_code == "1301"
    assert "sensitive content" in failure.message
    assert emu.stats()["tasks"]["failed"] == 1


@pytest.mark.parametrize("model", ["cogview-4", "glm-image"])
async def test_image_rate_limit_carries_retry_after(
    emu: RunningEmulator, session: aiohttp.ClientSession, model: str
) -> None:
    # Retry-After 6 is over the 5 s a call waits inside its attempt: the error goes to the store,
    # carrying the Retry-After its retry must honour (shorter ones: test_provider_backpressure.py).
    provider = make_provider(session, emu, model)
    ctx = image_ctx(provider, "a storm [[rate:6]]")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler(poll_interval=0.01).run(ctx)
    failure = caught.value.failure
    assert failure.kind is ErrorKind.RATE_LIMITED
    assert failure.retry_after == 6
    assert failure.provider_code == "1302"
    assert emu.stats()["statuses"] == {"429": 1}  # no retry inside the attempt
    assert provider.gate.limit == 1  # refused with 1 call in flight: this worker now sends 1 at a time


async def test_image_hang_times_out(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = image_ctx(make_provider(session, emu, "cogview-4", timeout=0.3), "a slow river [[hang:5]]")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT


async def test_image_huge_body_is_refused(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, emu, "cogview-4", max_body_bytes=512 * 1024)
    ctx = image_ctx(provider, "a mountain [[huge:4]]")
    with pytest.raises(ProviderError) as caught:
        await ImageHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.PROVIDER_BAD_RESPONSE
    assert "cap" in caught.value.failure.message


async def test_wrong_api_key_is_an_auth_failure(session: aiohttp.ClientSession) -> None:
    async with running_emulator(dataclasses.replace(FAST, api_key="the-right-key")) as emu:
        ctx = image_ctx(make_provider(session, emu, "glm-image", api_key="wrong"), "a gate")
        with pytest.raises(ProviderError) as caught:
            await ImageHandler().run(ctx)
        failure = caught.value.failure
        assert failure.kind is ErrorKind.PROVIDER_AUTH
        assert "CHARAI_IMAGE_API_KEY" in failure.message

        ok = image_ctx(make_provider(session, emu, "glm-image", api_key="the-right-key"), "a gate")
        result = await ImageHandler(poll_interval=0.01).run(ok)
        assert result.width == 1280


def test_image_handler_rejects_unknown_async_mode() -> None:
    with pytest.raises(ValueError, match="async_mode"):
        ImageHandler(async_mode="sometimes")


# =========================================================================== TTS

TEXT = "Hello there, traveller. The road north is long and the night is cold."


def expected_seconds(text: str, speed: float = 1.0) -> float:
    return audio_seconds(strip_markers(text), speed)


@pytest.mark.parametrize("response_format", ["wav", ""])
async def test_tts_wav(emu: RunningEmulator, session: aiohttp.ClientSession, response_format: str) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), TEXT, response_format)
    result = await TtsHandler().run(ctx)

    [(key, (data, content_type))] = ctx.media.items()
    assert key == "task-tts-1.wav"
    assert content_type == result.content_type == "audio/wav"
    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (24000, 1, 2)
        stdlib_seconds = reader.getnframes() / reader.getframerate()
    assert result.duration_seconds == pytest.approx(stdlib_seconds)
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT), rel=0.05)
    assert result.audio_url == "charai-media:task-tts-1.wav"
    assert (result.text, result.voice_style) == (TEXT, "tongtong")
    assert result.size_bytes == len(data)
    assert result.generated_at.seconds > 0
    assert_progress_shape(ctx)


async def test_tts_pcm(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), TEXT, "pcm")
    result = await TtsHandler().run(ctx)
    [(key, (data, content_type))] = ctx.media.items()
    assert key.endswith(".pcm")
    assert content_type == result.content_type == "audio/L16;rate=24000;channels=1"
    assert not data.startswith(b"RIFF")
    assert result.duration_seconds == len(data) / 48000
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT), rel=0.05)


async def test_tts_mp3_is_encoded_from_wav(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), TEXT, "mp3")
    result = await TtsHandler().run(ctx)
    [(key, (data, content_type))] = ctx.media.items()
    assert key.endswith(".mp3")
    assert content_type == result.content_type == "audio/mpeg"
    assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    info = mp3_info(data)
    assert (info.sample_rate, info.channels) == (24000, 1)
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT), rel=0.05)
    assert result.duration_seconds <= info.duration_seconds < result.duration_seconds + 0.2
    assert result.size_bytes == len(data)


async def test_tts_speed_changes_duration(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), TEXT, "wav", speed=2.0)
    result = await TtsHandler().run(ctx)
    assert result.duration_seconds == pytest.approx(expected_seconds(TEXT, 2.0), rel=0.05)


@pytest.mark.parametrize("marker", ["[[json-audio]]", "[[json-audio-url]]"])
@pytest.mark.parametrize("response_format", ["wav", "pcm", "mp3"])
async def test_tts_json_audio_answers(
    emu: RunningEmulator, session: aiohttp.ClientSession, marker: str, response_format: str
) -> None:
    text = f"{TEXT} {marker}"
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), text, response_format)
    result = await TtsHandler().run(ctx)
    [(data, _)] = ctx.media.values()
    assert result.duration_seconds == pytest.approx(expected_seconds(text), rel=0.05)
    if response_format == "wav":
        assert wav_info(data).duration_seconds == pytest.approx(result.duration_seconds)
    elif response_format == "pcm":
        assert not data.startswith(b"RIFF")  # the WAV inside the JSON was stripped to raw samples
        assert len(data) / 48000 == pytest.approx(result.duration_seconds)
    else:
        assert mp3_info(data).sample_rate == 24000
    assert emu.stats()["calls"]["files"] == (1 if marker == "[[json-audio-url]]" else 0)


TTS_FAILURES = [
    ("[[content]]", "wav", ErrorKind.CONTENT_REJECTED),
    ("[[server]]", "wav", ErrorKind.PROVIDER_UNAVAILABLE),
    ("[[quota]]", "mp3", ErrorKind.QUOTA_EXHAUSTED),
    ("[[truncated]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[truncated]]", "pcm", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[truncated]]", "mp3", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[truncated]] [[json-audio]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[bad-b64]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[bad-b64]]", "pcm", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[wrong-type]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[wrong-type]]", "pcm", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[garbage]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[garbage]]", "mp3", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[redirect]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200:9999]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200:9999]]", "pcm", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200]]", "wav", ErrorKind.PROVIDER_BAD_RESPONSE),
    ("[[json-error-200:1302]]", "mp3", ErrorKind.PROVIDER_BAD_RESPONSE),
]

#: As IMAGE_CHARGED: audio came (raw, or inline in JSON) and did not decode.
TTS_CHARGED = {"[[truncated]]", "[[bad-b64]]", "[[wrong-type]]", "[[garbage]]"}


@pytest.mark.parametrize(("marker", "response_format", "kind"), TTS_FAILURES)
async def test_tts_failure_modes(
    emu: RunningEmulator, session: aiohttp.ClientSession, marker: str, response_format: str, kind: ErrorKind
) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), f"Good morning. {marker}", response_format)
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert caught.value.failure.kind is kind, caught.value.failure
    assert ctx.media == {}
    assert len(ctx.metered) == (marker in TTS_CHARGED), ctx.metered


async def test_tts_rate_limit_carries_retry_after(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), "Hurry! [[rate:6]]")
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.RATE_LIMITED
    assert caught.value.failure.retry_after == 6


async def test_tts_hang_times_out(emu: RunningEmulator, session: aiohttp.ClientSession) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts", timeout=0.3), "Wait for it [[hang:5]]")
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT


async def test_tts_wrong_api_key(session: aiohttp.ClientSession) -> None:
    async with running_emulator(dataclasses.replace(FAST, api_key="the-right-key")) as emu:
        provider = make_provider(session, emu, "glm-tts", api_key="wrong", key_setting="CHARAI_TTS_API_KEY")
        with pytest.raises(ProviderError) as caught:
            await TtsHandler().run(tts_ctx(provider, TEXT))
        assert caught.value.failure.kind is ErrorKind.PROVIDER_AUTH
        assert "CHARAI_TTS_API_KEY" in caught.value.failure.message


async def test_tts_unknown_format_fails_without_a_provider_call(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    ctx = tts_ctx(make_provider(session, emu, "glm-tts"), TEXT, "ogg")
    with pytest.raises(ProviderError) as caught:
        await TtsHandler().run(ctx)
    assert caught.value.failure.kind is ErrorKind.INVALID_REQUEST
    assert emu.stats()["total_calls"] == 0


# =========================================================================== async edge cases
# The emulator always has the async route and never fails a status poll, so these run against a
# tiny scripted provider instead.


@dataclasses.dataclass
class Script:
    """What the scripted provider answers: the submit status, then one poll answer per poll;
    the synchronous route answers ``sync_image`` (default: a 1280x1280 PNG) as ``b64_json``."""

    submit_status: int = 200
    sync_image: bytes | None = None
    polls: list[tuple[int, dict[str, object]]] = dataclasses.field(default_factory=list)
    seen: list[str] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted_provider(script: Script) -> AsyncIterator[str]:
    png = make_png(1280, 1280, seed=7)

    async def submit(request: web.Request) -> web.Response:
        script.seen.append("submit")
        if script.submit_status != 200:
            return web.json_response(
                {"error": {"code": "404", "message": "no route"}}, status=script.submit_status
            )
        return web.json_response({"id": "job/../1", "task_status": "PROCESSING", "model": "glm-image"})

    async def poll(request: web.Request) -> web.Response:
        script.seen.append(f"poll {request.raw_path.rsplit('/', 1)[-1]}")
        status, body = script.polls.pop(0)
        return web.json_response(body, status=status)

    async def sync(request: web.Request) -> web.Response:
        script.seen.append("sync")
        image = png if script.sync_image is None else script.sync_image
        return web.json_response({"data": [{"b64_json": base64.b64encode(image).decode()}]})

    app = web.Application()
    app.router.add_post("/v4/async/images/generations", submit)
    app.router.add_get("/v4/async-result/{job}", poll)
    app.router.add_post("/v4/images/generations", sync)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v4"
    finally:
        await runner.cleanup()


def scripted_ctx(session: aiohttp.ClientSession, base_url: str) -> RecordingContext:
    config = ProviderConfig(
        base_url=base_url,
        api_key="k",
        model="glm-image",
        key_setting="CHARAI_IMAGE_API_KEY",
        allow_private_urls=True,
        timeout=5,
    )
    return image_ctx(ProviderHttp(session, config), "a scripted scene")


#: Provider answers (JSON bodies) the scripts replay.
SUCCESS: dict[str, object] = {
    "task_status": "SUCCESS",
    "image_result": [{"b64_json": base64.b64encode(make_png(1280, 1280)).decode()}],
}
PROCESSING: dict[str, object] = {"task_status": "PROCESSING"}
SERVER_ERROR: dict[str, object] = {"error": {"code": "1234", "message": "Network error"}}


async def test_auto_mode_falls_back_to_sync_without_an_async_route(session: aiohttp.ClientSession) -> None:
    script = Script(submit_status=404)
    async with scripted_provider(script) as base:
        result = await ImageHandler(async_mode="auto").run(scripted_ctx(session, base))
    assert result.width == 1280
    assert script.seen == ["submit", "sync"]


async def test_async_mode_does_not_fall_back(session: aiohttp.ClientSession) -> None:
    script = Script(submit_status=404)
    async with scripted_provider(script) as base:
        with pytest.raises(ProviderError) as caught:
            await ImageHandler(async_mode="async").run(scripted_ctx(session, base))
    assert caught.value.failure.http_status == 404
    assert script.seen == ["submit"]


async def test_transient_poll_failures_are_tolerated(session: aiohttp.ClientSession) -> None:
    script = Script(polls=[(500, SERVER_ERROR), (200, PROCESSING), (503, SERVER_ERROR), (200, SUCCESS)])
    async with scripted_provider(script) as base:
        ctx = scripted_ctx(session, base)
        result = await ImageHandler(poll_interval=0.01).run(ctx)
    assert result.height == 1280
    assert script.seen[1] == "poll job%2F..%2F1"  # the job id cannot escape the path
    assert_progress_shape(ctx)


async def test_too_many_poll_failures_fail_the_attempt(session: aiohttp.ClientSession) -> None:
    script = Script(polls=[(500, SERVER_ERROR)] * 4)
    async with scripted_provider(script) as base:
        with pytest.raises(ProviderError) as caught:
            await ImageHandler(poll_interval=0.01).run(scripted_ctx(session, base))
    assert caught.value.failure.kind is ErrorKind.PROVIDER_UNAVAILABLE
    assert len(script.seen) == 5


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((404, {"error": {"code": "404", "message": "Task not found"}}), "no longer knows"),
        ((200, {"task_status": "EXPLODED"}), "unknown job status"),
        ((200, {}), "unknown job status"),
        ((200, {"task_status": "FAIL"}), "the image job failed"),
        ((200, {"task_status": "SUCCESS", "image_result": []}), "no image_result"),
        ((200, {"task_status": "SUCCESS", "image_result": [{}]}), "neither url nor b64_json"),
    ],
)
async def test_bad_poll_answers_are_bad_responses(
    session: aiohttp.ClientSession, answer: tuple[int, dict[str, object]], reason: str
) -> None:
    script = Script(polls=[answer])
    async with scripted_provider(script) as base:
        with pytest.raises(ProviderError) as caught:
            await ImageHandler(poll_interval=0.01).run(scripted_ctx(session, base))
    assert caught.value.failure.kind is ErrorKind.PROVIDER_BAD_RESPONSE
    assert reason in caught.value.failure.message


def pillow_image(fmt: str, size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` but whose pixel data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "content_type", "extension"), [("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")]
)
async def test_jpeg_and_webp_are_stored_as_such(
    session: aiohttp.ClientSession, fmt: str, content_type: str, extension: str
) -> None:
    script = Script(sync_image=pillow_image(fmt))
    async with scripted_provider(script) as base:
        ctx = scripted_ctx(session, base)
        result = await ImageHandler(async_mode="sync").run(ctx)
    assert (result.content_type, result.width, result.height) == (content_type, 96, 64)
    assert list(ctx.media) == [f"task-img-1.{extension}"]


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (pillow_image("GIF"), "not a PNG, JPEG or WebP image (a GIF)"),
        (pillow_image("BMP"), "not a PNG, JPEG or WebP"),
        (pillow_image("JPEG")[:200], "corrupt or truncated"),
        (pillow_image("PNG")[:-20], "corrupt or truncated"),
        (png_claiming(64, 64), "corrupt or truncated"),
        (png_claiming(5000, 5000), "too large"),
        (png_claiming(30000, 30000), "too many pixels"),
        (b"\xff\xd8\xff" + pillow_image("PNG"), "cannot be read"),
    ],
)
async def test_images_that_are_not_acceptable(
    session: aiohttp.ClientSession, image: bytes, reason: str
) -> None:
    script = Script(sync_image=image)
    async with scripted_provider(script) as base:
        ctx = scripted_ctx(session, base)
        with pytest.raises(ProviderError) as caught:
            await ImageHandler(async_mode="sync").run(ctx)
    assert caught.value.failure.kind is ErrorKind.PROVIDER_BAD_RESPONSE
    assert reason in caught.value.failure.message
    assert ctx.media == {}
