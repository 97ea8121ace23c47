"""Integration tests for the emulator's OpenAI dialect (``--dialect openai``).

They drive a real TCP server on a free port over HTTP and check the wire contract of
``/v1/images/generations`` and ``/v1/audio/speech``: per-model validation, OpenAI's error
envelope, the failure modes, real media bytes (PNG, JPEG, WebP, MP3, WAV, PCM parsed here with
independent header readers or Pillow), and the call log other tests meter usage against.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from charai.devstack.stack import Stack
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from PIL import Image

FAST = EmulatorConfig(
    latency_min=0.0, latency_max=0.01, async_poll_steps=1, seed=1, dialects=frozenset({"zhipu", "openai"})
)
RATE = 24000

EXPECTED_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "auth": (401, "invalid_request_error", "invalid_api_key"),
    "forbidden": (403, "invalid_request_error", "unsupported_country_region_territory"),
    "content": (400, "invalid_request_error", "content_policy_violation"),
    "invalid": (400, "invalid_request_error", None),
    "model": (404, "invalid_request_error", "model_not_found"),
    "too-long": (400, "invalid_request_error", "string_above_max_length"),
    "quota": (429, "insufficient_quota", "insufficient_quota"),
    "rate": (429, "requests", "rate_limit_exceeded"),
    "overload": (503, "server_error", None),
    "server": (500, "server_error", None),
    "zhipu-500": (500, "server_error", None),
}
"""Written out here, not imported: the test must fail if the emulator's table drifts."""


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator(FAST) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def image(
    http: aiohttp.ClientSession, emu: RunningEmulator, headers: dict[str, str] | None = None, **body: Any
) -> aiohttp.ClientResponse:
    body.setdefault("prompt", "a red fox")
    return await http.post(
        f"{emu.openai_base}/images/generations", json=body, headers=headers, allow_redirects=False
    )


async def speech(
    http: aiohttp.ClientSession, emu: RunningEmulator, headers: dict[str, str] | None = None, **body: Any
) -> aiohttp.ClientResponse:
    body.setdefault("model", "gpt-4o-mini-tts")
    body.setdefault("input", "Hello there, traveller.")
    body.setdefault("voice", "alloy")
    return await http.post(
        f"{emu.openai_base}/audio/speech", json=body, headers=headers, allow_redirects=False
    )


async def openai_error(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The ``error`` object of an answer, after checking status and the exact envelope keys."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def png_dims(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


_MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def mp3_frames(data: bytes) -> tuple[int, int]:
    """(sample rate, frame count) of an MPEG-2 Layer III stream, walking every frame header."""
    pos = 0
    if data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        pos = 10 + size
    rate = 0
    frames = 0
    while pos + 4 <= len(data):
        b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
        assert data[pos] == 0xFF and b1 & 0xE0 == 0xE0, f"no frame sync at byte {pos}"
        assert (b1 >> 3) & 3 == 0b10, "not MPEG-2"
        assert (b1 >> 1) & 3 == 0b01, "not Layer III"
        rate = (22050, 24000, 16000)[(b2 >> 2) & 3]
        kbps = _MPEG2_L3_KBPS[b2 >> 4]
        assert kbps, "free or bad bitrate"
        assert b3 >> 6 == 3, "not mono"
        pos += 72 * kbps * 1000 // rate + ((b2 >> 1) & 1)
        frames += 1
    assert pos == len(data), "trailing bytes after the last frame"
    return rate, frames


def expected_seconds(text: str, speed: float = 1.0) -> float:
    """The emulator's documented duration: 60 ms per character at speed 1, at least 0.3 s."""
    return round(max(0.3, 0.06 * len(text) / speed) * RATE) / RATE


# --------------------------------------------------------------------------- images


async def test_dall_e_2_answers_a_url_to_a_real_png(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    resp = await image(http, emu, model="dall-e-2", size="512x512")
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"created", "data"}
    assert isinstance(body["created"], int)
    [item] = body["data"]
    assert set(item) == {"url"}
    assert item["url"].startswith(f"{emu.url}/files/")
    got = await http.get(item["url"])
    assert got.headers["Content-Type"] == "image/png"
    assert png_dims(await got.read()) == (512, 512)


async def test_dall_e_2_is_the_default_model_with_n_images(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    resp = await image(http, emu, n=3, size="256x256", response_format="b64_json")
    body = await resp.json()
    images = [base64.b64decode(item["b64_json"], validate=True) for item in body["data"]]
    assert [png_dims(data) for data in images] == [(256, 256)] * 3
    assert len(set(images)) == 3  # each image of one call differs
    [record] = emu.stats()["log"]
    assert (record["model"], record["n"], record["images"], record["size"]) == ("dall-e-2", 3, 3, "256x256")


async def test_dall_e_3_b64_hd_with_revised_prompt(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await image(
        http,
        emu,
        model="dall-e-3",
        size="1792x1024",
        quality="hd",
        style="natural",
        response_format="b64_json",
    )
    assert resp.status == 200
    [item] = (await resp.json())["data"]
    assert item["revised_prompt"] == "a red fox"
    assert png_dims(base64.b64decode(item["b64_json"], validate=True)) == (1792, 1024)


@pytest.mark.parametrize(
    ("fmt", "pil_format", "size", "dims"),
    [
        ("png", "PNG", "1536x1024", (1536, 1024)),
        ("jpeg", "JPEG", "1024x1536", (1024, 1536)),
        ("webp", "WEBP", "auto", (1024, 1024)),
    ],
)
async def test_gpt_image_always_answers_b64_in_its_output_format(
    emu: RunningEmulator,
    http: aiohttp.ClientSession,
    fmt: str,
    pil_format: str,
    size: str,
    dims: tuple[int, int],
) -> None:
    resp = await image(http, emu, model="gpt-image-1", size=size, quality="high", output_format=fmt)
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"created", "data", "usage"}
    [item] = body["data"]
    assert set(item) == {"b64_json"}
    data = base64.b64decode(item["b64_json"], validate=True)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == pil_format
        assert decoded.size == dims
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    [record] = emu.stats()["log"]
    assert record["output_format"] == fmt
    assert record["response_format"] == "b64_json"
    assert (record["width"], record["height"], record["quality"]) == (*dims, "high")


async def test_gpt_image_mini_defaults(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await image(http, emu, model="gpt-image-1-mini")
    [item] = (await resp.json())["data"]
    assert png_dims(base64.b64decode(item["b64_json"])) == (1024, 1024)
    [record] = emu.stats()["log"]
    assert (record["size"], record["quality"], record["output_format"]) == ("auto", "auto", "png")


async def test_gpt_image_refuses_response_format(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    for value in ("b64_json", "url"):
        error = await openai_error(await image(http, emu, model="gpt-image-1", response_format=value), 400)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "response_format"
        assert "response_format" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "dall-e-3", "size": "512x512"}, "size"),
        ({"model": "dall-e-2", "size": "1792x1024"}, "size"),
        ({"model": "gpt-image-1", "size": "1024x1792"}, "size"),
        ({"model": "dall-e-3", "quality": "high"}, "quality"),
        ({"model": "dall-e-2", "quality": "hd"}, "quality"),
        ({"model": "gpt-image-1", "quality": "hd"}, "quality"),
        ({"model": "gpt-image-1", "output_format": "gif"}, "output_format"),
        ({"model": "dall-e-3", "output_format": "png"}, "output_format"),
        ({"model": "dall-e-2", "response_format": "png"}, "response_format"),
        ({"model": "dall-e-3", "n": 2}, "n"),
        ({"model": "dall-e-2", "n": 11}, "n"),
        ({"model": "dall-e-2", "n": True}, "n"),
        ({"model": "dall-e-2", "style": "vivid"}, "style"),
        ({"model": "gpt-image-1", "background": "transparent", "output_format": "jpeg"}, "background"),
        ({"model": "dall-e-2", "prompt": " "}, "prompt"),
        ({"model": "dall-e-2", "stream": True}, "stream"),
        ({"model": "dall-e-3", "prompt": "x" * 4001}, "prompt"),
        ({"model": "dall-e-2", "prompt": "x" * 1001}, "prompt"),
        ({"model": "gpt-image-1", "prompt": "x" * 32001}, "prompt"),
    ],
)
async def test_image_validation_names_the_param(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    error = await openai_error(await image(http, emu, **body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_prompt_limits_are_inclusive(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    for model, limit in (("dall-e-2", 1000), ("dall-e-3", 4000), ("gpt-image-1", 32000)):
        resp = await image(http, emu, model=model, prompt="x" * limit, size="1024x1024")
        assert resp.status == 200, model


@pytest.mark.parametrize("field", ["watermark_enabled", "request_id", "user_id", "volume"])
async def test_unknown_image_argument(emu: RunningEmulator, http: aiohttp.ClientSession, field: str) -> None:
    extra: dict[str, Any] = {field: "x"}
    error = await openai_error(await image(http, emu, model="dall-e-3", **extra), 400)
    assert error["message"] == f"Unrecognized request argument supplied: {field}"
    assert error["param"] == field


async def test_unknown_image_model_is_404(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    error = await openai_error(await image(http, emu, model="cogview-4"), 404)
    assert error["code"] == "model_not_found"
    assert "cogview-4" in error["message"]


# --------------------------------------------------------------------------- speech


async def test_speech_default_is_real_mp3(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "Hello there, traveller."
    resp = await speech(http, emu, input=text)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/mpeg"
    rate, frames = mp3_frames(await resp.read())
    assert rate == RATE
    decoded = frames * 576 / RATE
    # The encoder pads the start and the last frame: at most a few frames longer, never shorter.
    assert expected_seconds(text) <= decoded <= expected_seconds(text) + 0.2
    [record] = emu.stats()["log"]
    assert record["audio_seconds"] == pytest.approx(expected_seconds(text))
    assert (record["response_format"], record["voice"], record["speed"]) == ("mp3", "alloy", 1.0)


async def test_speech_wav_is_24k_mono_s16(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "x" * 100
    resp = await speech(http, emu, input=text, response_format="wav", speed=2.0, voice="cedar")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/wav"
    data = await resp.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (RATE, 1, 2)
        frames = reader.getnframes()
    assert frames / RATE == pytest.approx(expected_seconds(text, 2.0))
    [record] = emu.stats()["log"]
    assert record["audio_seconds"] == frames / RATE
    assert record["audio_bytes"] == len(data)
    assert (record["speed"], record["voice"], record["input_chars"]) == (2.0, "cedar", 100)


async def test_speech_pcm_is_raw_s16le(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "abc def"
    resp = await speech(http, emu, input=text, response_format="pcm", speed=0.25, model="tts-1")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/pcm"
    data = await resp.read()
    assert len(data) % 2 == 0
    assert len(data) / 2 / RATE == pytest.approx(expected_seconds(text, 0.25))
    assert any(struct.unpack_from("<h", data, i)[0] for i in range(0, 2000, 2))  # not silence


@pytest.mark.parametrize("fmt", ["opus", "aac", "flac"])
async def test_speech_formats_the_emulator_cannot_produce(
    emu: RunningEmulator, http: aiohttp.ClientSession, fmt: str
) -> None:
    error = await openai_error(await speech(http, emu, response_format=fmt), 400)
    assert error["param"] == "response_format"
    assert f"cannot produce {fmt}" in error["message"]


async def test_speech_refuses_zhipu_volume(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    error = await openai_error(await speech(http, emu, volume=1.0), 400)
    assert error == {
        "message": "Unrecognized request argument supplied: volume",
        "type": "invalid_request_error",
        "param": "volume",
        "code": None,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"voice": "tongtong"}, "voice"),
        ({"voice": None}, "voice"),
        ({"input": "x" * 4097}, "input"),
        ({"input": ""}, "input"),
        ({"speed": 0.2}, "speed"),
        ({"speed": 4.01}, "speed"),
        ({"speed": "fast"}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
        ({"stream_format": "sse"}, "stream_format"),
        ({"encode_format": "base64"}, "encode_format"),
        ({"stream": False}, "stream"),
    ],
)
async def test_speech_validation_names_the_param(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    if body.get("voice", "") is None:
        payload = {"model": "tts-1", "input": "hi"}
        resp = await http.post(f"{emu.openai_base}/audio/speech", json=payload)
    else:
        resp = await speech(http, emu, **body)
    error = await openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_speech_limits_are_inclusive(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    for body in ({"input": "y" * 4096, "response_format": "pcm"}, {"speed": 0.25}, {"speed": 4.0}):
        assert (await speech(http, emu, **body)).status == 200, body
    for voice in (
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "onyx",
        "nova",
        "sage",
        "shimmer",
        "verse",
        "marin",
    ):
        assert (await speech(http, emu, voice=voice, response_format="pcm")).status == 200, voice


async def test_unknown_speech_model_is_404(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    error = await openai_error(await speech(http, emu, model="glm-tts"), 404)
    assert error["code"] == "model_not_found"


# --------------------------------------------------------------------------- auth, dialects, routes


async def test_api_key(http: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(
        latency_min=0, latency_max=0, api_key="sk-oai-secret", dialects=frozenset({"openai"})
    )
    async with running_emulator(config) as emu:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sk-oai-secret"}):
            for post in (image, speech):
                resp = await post(http, emu, headers=headers)
                error = await openai_error(resp, 401)
                assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
                assert "sk-oai-secret" not in json.dumps(error) and "wrong" not in error["message"]
        ok = await image(http, emu, headers={"Authorization": "Bearer sk-oai-secret"}, model="dall-e-2")
        assert ok.status == 200
        assert (await http.get((await ok.json())["data"][0]["url"])).status == 200  # files need no key
        assert emu.stats()["statuses"] == {"401": 6, "200": 1}


async def test_only_enabled_dialects_are_served(http: aiohttp.ClientSession) -> None:
    zhipu_body = {"model": "cogview-4", "prompt": "x"}
    async with running_emulator(EmulatorConfig(latency_min=0, latency_max=0)) as zhipu_only:
        assert zhipu_only.stats()["dialects"] == ["zhipu"]
        error = await openai_error(await image(http, zhipu_only, model="dall-e-2"), 404)
        assert error["message"] == "Invalid URL (POST /v1/images/generations)"
        await openai_error(await speech(http, zhipu_only), 404)
        assert (await http.post(f"{zhipu_only.api_base}/images/generations", json=zhipu_body)).status == 200
    openai_only = EmulatorConfig(latency_min=0, latency_max=0, dialects=frozenset({"openai"}))
    async with running_emulator(openai_only) as emu:
        resp = await http.post(f"{emu.api_base}/images/generations", json=zhipu_body)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "404"
        assert (await image(http, emu, model="dall-e-2")).status == 200
        assert (await http.get(f"{emu.url}/healthz")).status == 200
        assert (await http.get(f"{emu.url}/_emulator/gate")).status == 200
    with pytest.raises(ValueError, match="dialects"):
        EmulatorConfig(dialects=frozenset({"anthropic"}))


async def test_unknown_route_and_bad_json_are_openai_shaped(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    error = await openai_error(await http.post(f"{emu.openai_base}/chat/completions", json={}), 404)
    assert error["message"] == "Invalid URL (POST /v1/chat/completions)"
    error = await openai_error(await http.post(f"{emu.openai_base}/audio/speech", data=b"{nope"), 400)
    assert error["type"] == "invalid_request_error"
    error = await openai_error(await http.post(f"{emu.openai_base}/images/generations", json=[1]), 400)
    assert error["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- failure modes


@pytest.mark.parametrize("mode", sorted(EXPECTED_ERRORS))
@pytest.mark.parametrize("route", ["image", "speech"])
async def test_error_modes_in_openai_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession, route: str, mode: str
) -> None:
    status, type_, code = EXPECTED_ERRORS[mode]
    if route == "image":
        resp = await image(http, emu, model="gpt-image-1", prompt=f"fail [[{mode}]]")
    else:
        resp = await speech(http, emu, input=f"fail [[{mode}]]")
    error = await openai_error(resp, status)
    assert (error["type"], error["code"]) == (type_, code)
    if mode == "rate":
        assert resp.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in resp.headers
    stats = emu.stats()
    assert stats["modes"] == {mode: 1}
    [record] = stats["log"]
    assert (record["dialect"], record["status"], record["mode"], record["images"]) == (
        "openai",
        status,
        mode,
        0,
    )
    assert record["audio_seconds"] is None


async def test_rate_argument_limit_and_header(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "limited [[rate*2:3]]"
    first = await speech(http, emu, input=text)
    assert first.status == 429 and first.headers["Retry-After"] == "3"
    assert (await speech(http, emu, input=text)).status == 429
    assert (await speech(http, emu, input=text)).status == 200
    resp = await image(http, emu, headers={"X-Emulator-Mode": "quota"}, prompt="text says [[server]]")
    assert (await openai_error(resp, 429))["code"] == "insufficient_quota"


async def test_body_modes(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    cut = await image(http, emu, model="dall-e-2", prompt="cut [[truncated]]")
    assert cut.status == 200
    with pytest.raises(ValueError):
        json.loads(await cut.read())
    cut_audio = await speech(http, emu, input="cut [[truncated]]", response_format="pcm")
    assert len(await cut_audio.read()) % 2 == 1
    bad = await image(http, emu, model="gpt-image-1", prompt="[[bad-b64]]")
    with pytest.raises(ValueError):
        base64.b64decode((await bad.json())["data"][0]["b64_json"], validate=True)
    garbage = await speech(http, emu, input="[[garbage]]")
    assert garbage.headers["Content-Type"] == "audio/mpeg"
    assert (await garbage.read())[:1] == b"\x00"
    html = await speech(http, emu, input="[[wrong-type]]")
    assert html.content_type == "text/html"
    redirect = await image(http, emu, prompt="[[redirect]]", model="dall-e-2")
    assert redirect.status == 302
    in_200 = await speech(http, emu, input="[[json-error-200]]")
    assert (await openai_error(in_200, 200))["code"] == "content_policy_violation"
    quota_200 = await image(http, emu, prompt="[[json-error-200:insufficient_quota]]", model="dall-e-2")
    assert (await openai_error(quota_200, 200))["type"] == "insufficient_quota"
    huge = await image(http, emu, prompt="[[huge:1]]", model="gpt-image-1")
    assert len(await huge.read()) > 1024 * 1024
    later = await speech(http, emu, input="[[hang:0.05]]", response_format="wav")
    assert (await later.read())[:4] == b"RIFF"
    assert emu.stats()["modes"] == {
        "truncated": 2,
        "bad-b64": 1,
        "garbage": 1,
        "wrong-type": 1,
        "redirect": 1,
        "json-error-200": 2,
        "huge": 1,
        "hang": 1,
    }
    delivered = [(r["mode"], r["images"], r["audio_seconds"] is not None) for r in emu.stats()["log"]]
    assert [d for d in delivered if d[1] or d[2]] == [("hang", 0, True)]


async def test_concurrency_limit_and_gate(http: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency_min=0, latency_max=0, max_concurrency=1, dialects=frozenset({"openai"}))
    async with running_emulator(config) as emu:
        emu.close_gate()
        held = asyncio.create_task(speech(http, emu, input="held"))
        await emu.wait_held(1, timeout=10)
        error = await openai_error(await image(http, emu, model="dall-e-2"), 429)
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert not held.done()
        emu.open_gate()
        assert (await held).status == 200
        assert emu.stats()["concurrency"]["rejected"] == 1


# --------------------------------------------------------------------------- call log


async def test_call_log_records_both_dialects(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    await image(http, emu, model="dall-e-3", quality="hd", size="1024x1792")
    await speech(http, emu, input="four", response_format="wav", speed=1.5, voice="nova", model="tts-1-hd")
    await http.post(
        f"{emu.api_base}/audio/speech", json={"model": "glm-tts", "input": "zhipu says", "voice": "x"}
    )
    await http.post(f"{emu.api_base}/images/generations", json={"model": "cogview-4", "prompt": "z"})
    await speech(http, emu, voice="nobody")
    stats = await (await http.get(f"{emu.url}/_emulator/stats")).json()
    assert stats["calls"]["openai.images.generations"] == 1
    assert stats["calls"]["openai.audio.speech"] == 2
    assert stats["total_calls"] == 5
    assert stats["log_dropped"] == 0
    dalle, oai_tts, glm_tts, cogview, refused = stats["log"]
    assert dalle == {
        "dialect": "openai",
        "route": "openai.images.generations",
        "text": "a red fox",
        "input_chars": 9,
        "model": "dall-e-3",
        "size": "1024x1792",
        "quality": "hd",
        "response_format": "url",
        "output_format": "png",
        "n": 1,
        "voice": None,
        "speed": None,
        "width": 1024,
        "height": 1792,
        "status": 200,
        "mode": None,
        "images": 1,
        "audio_seconds": None,
        "audio_bytes": None,
    }
    assert oai_tts["model"] == "tts-1-hd"
    assert (oai_tts["voice"], oai_tts["speed"], oai_tts["input_chars"]) == ("nova", 1.5, 4)
    assert oai_tts["audio_seconds"] == pytest.approx(expected_seconds("four", 1.5))
    assert (glm_tts["dialect"], glm_tts["route"], glm_tts["response_format"]) == (
        "zhipu",
        "audio.speech",
        "pcm",
    )
    assert glm_tts["audio_seconds"] == pytest.approx(expected_seconds("zhipu says"))
    assert (cogview["dialect"], cogview["size"], cogview["images"]) == ("zhipu", "1024x1024", 1)
    assert (refused["status"], refused["voice"], refused["audio_seconds"]) == (400, "nobody", None)
    await http.post(f"{emu.url}/_emulator/reset")
    assert emu.stats()["log"] == []


async def test_call_log_is_bounded(http: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency_min=0, latency_max=0, dialects=frozenset({"openai"}), call_log_size=2)
    async with running_emulator(config) as emu:
        for text in ("one", "two", "three"):
            await speech(http, emu, input=text, response_format="pcm")
        stats = emu.stats()
        assert [r["text"] for r in stats["log"]] == ["two", "three"]
        assert stats["log_dropped"] == 1


# --------------------------------------------------------------------------- process


async def test_cli_dialect(http: aiohttp.ClientSession) -> None:
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "charai.emulator", "--dialect", "zhipu,grok", stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(bad.communicate(), timeout=30)
    assert bad.returncode == 2
    assert b"unknown dialect 'grok'" in err
    env = {**os.environ, "CHARAI_EMULATOR_ADDR": "127.0.0.1:0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "charai.emulator",
        "--dialect",
        "openai",
        "--latency",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        announced = json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=30))
        assert announced["openai_base"] == announced["url"] + "/v1"
        assert announced["dialects"] == ["openai"]
        resp = await http.post(
            f"{announced['openai_base']}/audio/speech",
            json={"model": "tts-1", "input": "cli", "voice": "alloy", "response_format": "wav"},
        )
        assert resp.status == 200
        assert (await resp.read())[:4] == b"RIFF"
        zhipu = await http.post(
            f"{announced['api_base']}/audio/speech", json={"model": "glm-tts", "input": "x"}
        )
        assert zhipu.status == 404
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0


async def test_devstack_wires_each_worker_to_its_dialect(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    env = {
        "CHARAI_NATS_URL": "nats://127.0.0.1:1",  # no charai service starts, so nothing connects to it
        "CHARAI_IMAGE_API_KEY": "",
        "CHARAI_TTS_API_KEY": "",
        "CHARAI_TTS_PROVIDER": "openai",
    }
    async with Stack(tmp_path, env, services=()) as stack:
        wired = stack.env
        assert wired["CHARAI_TTS_API_BASE_URL"] == stack.emulator_url + "/v1"
        assert wired["CHARAI_TTS_MODEL"] == "gpt-4o-mini-tts"
        assert wired["CHARAI_IMAGE_API_BASE_URL"] == stack.emulator_url + "/api/paas/v4"
        assert "CHARAI_IMAGE_MODEL" not in wired
        body = {"model": wired["CHARAI_TTS_MODEL"], "input": "hi", "voice": "alloy"}
        resp = await http.post(f"{wired['CHARAI_TTS_API_BASE_URL']}/audio/speech", json=body)
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/mpeg"
        zhipu = {"model": "cogview-4", "prompt": "x"}
        resp = await http.post(f"{wired['CHARAI_IMAGE_API_BASE_URL']}/images/generations", json=zhipu)
        assert resp.status == 200
    chosen = {**env, "CHARAI_IMAGE_PROVIDER": "OpenAI", "CHARAI_IMAGE_MODEL": "dall-e-3"}
    async with Stack(tmp_path, chosen, services=()) as stack:
        assert stack.env["CHARAI_IMAGE_API_BASE_URL"] == stack.emulator_url + "/v1"
        assert stack.env["CHARAI_IMAGE_MODEL"] == "dall-e-3"
        body = {"model": "dall-e-3", "prompt": "x"}
        resp = await http.post(f"{stack.env['CHARAI_IMAGE_API_BASE_URL']}/images/generations", json=body)
        assert resp.status == 200
        zhipu_route = await http.post(f"{stack.emulator_url}/api/paas/v4/images/generations", json=body)
        assert zhipu_route.status == 404  # only the dialect the workers need is served
    with pytest.raises(ValueError, match="CHARAI_TTS_PROVIDER"):
        async with Stack(tmp_path, {**env, "CHARAI_TTS_PROVIDER": "anthropic"}, services=()):
            pass
