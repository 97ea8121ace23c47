"""Integration tests for the Zhipu provider emulator (``charai.emulator``).

They drive a real TCP server on a free port with aiohttp, the way workers will, and check
the wire contract: shapes, status codes, string error codes, headers and media bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.emulator.media import PNG_SIGNATURE, make_png, make_wav, png_size

from tests.conftest import eventually

FAST = EmulatorConfig(latency_min=0.0, latency_max=0.01, async_poll_steps=2, seed=1)


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator(FAST) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def png_dims(data: bytes) -> tuple[int, int]:
    """Independent IHDR parse (does not reuse the module under test)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def post_image(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    prompt: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> aiohttp.ClientResponse:
    body = {"model": "cogview-4", "prompt": prompt, "size": "512x512", **extra}
    return await http.post(
        f"{emu.api_base}/images/generations", json=body, headers=headers, allow_redirects=False
    )


async def post_speech(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    text: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> aiohttp.ClientResponse:
    body = {"model": "glm-tts", "input": text, "voice": "tongtong", **extra}
    return await http.post(f"{emu.api_base}/audio/speech", json=body, headers=headers, allow_redirects=False)


# --------------------------------------------------------------------------- media


def test_make_png_is_valid_and_deterministic() -> None:
    data = make_png(1024, 1024, seed=3)
    assert png_dims(data) == (1024, 1024)
    assert png_size(data) == (1024, 1024)
    assert data == make_png(1024, 1024, seed=3)
    assert data != make_png(1024, 1024, seed=4)
    assert data.endswith(b"IEND\xaeB`\x82")


def test_make_wav_duration() -> None:
    with wave.open(io.BytesIO(make_wav("x" * 100, 2.0))) as reader:
        assert reader.getframerate() == 24000
        assert abs(reader.getnframes() / 24000 - 3.0) < 0.01
    with wave.open(io.BytesIO(make_wav("a", 1.0))) as reader:
        assert abs(reader.getnframes() / 24000 - 0.3) < 0.01


# --------------------------------------------------------------------------- images


async def test_sync_image_url_is_real_png(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "a red fox", size="768x1344")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["created"], int)
    assert body["content_filter"] == [{"role": "assistant", "level": 3}]
    url = body["data"][0]["url"]
    assert url.startswith(f"{emu.url}/files/") and url.endswith(".png")
    file_resp = await http.get(url)
    assert file_resp.status == 200
    assert file_resp.headers["Content-Type"] == "image/png"
    assert png_dims(await file_resp.read()) == (768, 1344)


async def test_glm_image_default_size(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(f"{emu.api_base}/images/generations", json={"model": "glm-image", "prompt": "x"})
    body = await resp.json()
    data = await (await http.get(body["data"][0]["url"])).read()
    assert png_dims(data) == (1280, 1280)


async def test_b64_mode(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "b64 please", size="1024x1024", response_format="b64_json")
    body = await resp.json()
    data = base64.b64decode(body["data"][0]["b64_json"], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    assert png_dims(data) == (1024, 1024)


async def test_unknown_file_is_404(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.get(f"{emu.url}/files/nope.png")
    assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "cogview-4"}, "1214"),
        ({"model": "cogview-4", "prompt": "  "}, "1214"),
        ({"model": "dall-e-3", "prompt": "x"}, "1211"),
        ({"prompt": "x"}, "1214"),
        ({"model": "cogview-4", "prompt": "x", "size": "1000x1000"}, "1214"),
        ({"model": "cogview-4", "prompt": "x", "size": "1024\u00d71024"}, "1214"),
        ({"model": "cogview-4", "prompt": "x", "size": "4096x4096"}, "1214"),
        ({"model": "glm-image", "prompt": "x", "size": "512x512"}, "1214"),
        ({"model": "cogview-4", "prompt": "x", "response_format": "png"}, "1214"),
    ],
)
async def test_image_validation(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: dict[str, Any], code: str
) -> None:
    resp = await http.post(f"{emu.api_base}/images/generations", json=body)
    assert resp.status == 400
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)


async def test_invalid_json_body(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(f"{emu.api_base}/images/generations", data=b"{not json")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "1214"


async def test_unknown_api_route_is_json(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(f"{emu.api_base}/chat/nothing", json={})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "404"


# --------------------------------------------------------------------------- async images


async def poll_until_done(
    http: aiohttp.ClientSession, emu: RunningEmulator, task_id: str
) -> tuple[int, dict[str, Any]]:
    for processing in range(200):
        resp = await http.get(f"{emu.api_base}/async-result/{task_id}")
        assert resp.status == 200
        body = await resp.json()
        if body["task_status"] != "PROCESSING":
            return processing, body
        await asyncio.sleep(0.005)
    raise AssertionError("task never finished")


async def test_async_submit_and_poll(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations",
        json={"model": "glm-image", "prompt": "slow castle", "size": "1088x1472", "request_id": "r-1"},
    )
    assert resp.status == 200
    submitted = await resp.json()
    assert submitted["task_status"] == "PROCESSING"
    assert submitted["model"] == "glm-image"
    assert submitted["request_id"] == "r-1"
    processing, final = await poll_until_done(http, emu, submitted["id"])
    assert processing >= FAST.async_poll_steps
    assert final["task_status"] == "SUCCESS"
    assert final["request_id"] == "r-1"
    data = await (await http.get(final["image_result"][0]["url"])).read()
    assert png_dims(data) == (1088, 1472)
    again = await (await http.get(f"{emu.api_base}/async-result/{submitted['id']}")).json()
    assert again == final
    stats = emu.stats()
    assert stats["tasks"] == {"created": 1, "succeeded": 1, "failed": 0}
    assert stats["calls"]["async-result"] == processing + 2


async def test_async_respects_latency(http: aiohttp.ClientSession) -> None:
    latency = 0.3
    config = EmulatorConfig(latency_min=latency, latency_max=latency, async_poll_steps=0)
    async with running_emulator(config) as emu:
        sent = time.monotonic()
        resp = await http.post(
            f"{emu.api_base}/async/images/generations", json={"model": "glm-image", "prompt": "p"}
        )
        task_id = (await resp.json())["id"]
        # The task is ready `latency` after the emulator took the submit, which was after `sent`:
        # a poll answered before sent + latency must find it processing, and no poll may find
        # it done before then. Polled until done (no sleep standing in for the latency).
        answers: list[tuple[float, str]] = []
        while not answers or answers[-1][1] != "SUCCESS":
            body = await (await http.get(f"{emu.api_base}/async-result/{task_id}")).json()
            answers.append((time.monotonic() - sent, body["task_status"]))
            assert answers[-1][1] in ("PROCESSING", "SUCCESS"), answers
            assert len(answers) < 10_000, answers[-3:]
            await asyncio.sleep(0.01)
        assert answers[-1][0] >= latency, answers[-3:]
        assert all(status == "PROCESSING" for at, status in answers if at < latency)


async def test_async_rejects_other_models(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations", json={"model": "cogview-4", "prompt": "x"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "1211"


async def test_async_unknown_task(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.get(f"{emu.api_base}/async-result/does-not-exist")
    assert resp.status == 404
    assert "code" in (await resp.json())["error"]


@pytest.mark.parametrize(("mode", "code"), [("content", "1301"), ("server", "500"), ("zhipu-500", "1234")])
async def test_async_task_fail(
    emu: RunningEmulator, http: aiohttp.ClientSession, mode: str, code: str
) -> None:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations",
        json={"model": "glm-image", "prompt": f"doomed [[{mode}]]"},
    )
    assert resp.status == 200
    _, final = await poll_until_done(http, emu, (await resp.json())["id"])
    assert final["task_status"] == "FAIL"
    assert final["error"]["code"] == code
    assert emu.stats()["tasks"]["failed"] == 1


async def test_async_submit_time_errors(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations",
        json={"model": "glm-image", "prompt": "[[rate:3]]"},
    )
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3"


async def test_async_body_mode_applies_to_result(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations",
        json={"model": "glm-image", "prompt": "[[truncated]]"},
    )
    task_id = (await resp.json())["id"]
    for _ in range(200):
        poll = await http.get(f"{emu.api_base}/async-result/{task_id}")
        text = await poll.text()
        try:
            if json.loads(text)["task_status"] == "PROCESSING":
                await asyncio.sleep(0.005)
                continue
        except json.JSONDecodeError:
            return
        raise AssertionError(f"expected a truncated body, got {text}")
    raise AssertionError("task never finished")


# --------------------------------------------------------------------------- TTS


async def test_tts_wav(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "Hello there, this is a test."
    resp = await post_speech(http, emu, text, response_format="wav", speed=1.0, volume=2)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/wav"
    data = await resp.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as reader:
        assert reader.getframerate() == 24000
        assert reader.getnchannels() == 1
        assert reader.getsampwidth() == 2
        assert abs(reader.getnframes() / 24000 - 0.06 * len(text)) < 0.05


async def test_tts_pcm_default(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_speech(http, emu, "short")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/pcm"
    data = await resp.read()
    assert len(data) % 2 == 0
    assert len(data) == 2 * round(24000 * 0.3)
    assert not data.startswith(b"RIFF")


async def test_tts_json_audio(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_speech(http, emu, "speak [[json-audio]]", response_format="wav")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    audio = base64.b64decode((await resp.json())["audio_content"], validate=True)
    with wave.open(io.BytesIO(audio)) as reader:
        assert reader.getframerate() == 24000


async def test_tts_json_audio_url(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_speech(http, emu, "speak [[json-audio-url]]")
    assert resp.content_type == "application/json"
    url = (await resp.json())["audio_url"]
    assert url.startswith(f"{emu.url}/files/") and url.endswith(".wav")
    file_resp = await http.get(url)
    assert file_resp.headers["Content-Type"] == "audio/wav"
    assert (await file_resp.read())[:4] == b"RIFF"


async def test_tts_stream(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_speech(http, emu, "x" * 40, stream=True)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pcm = b"".join(base64.b64decode(c["choices"][0]["delta"]["content"]) for c in chunks)
    assert len(pcm) == 2 * round(24000 * 0.06 * 40)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"response_format": "mp3"}, "1214"),
        ({"speed": 3}, "1214"),
        ({"speed": 0.4}, "1214"),
        ({"volume": 0}, "1214"),
        ({"volume": 11}, "1214"),
        ({"model": "tts-1"}, "1211"),
        ({"input": ""}, "1214"),
        ({"input": "x" * 1025}, "1261"),
        ({"stream": True, "response_format": "wav"}, "1214"),
    ],
)
async def test_tts_validation(
    emu: RunningEmulator, http: aiohttp.ClientSession, extra: dict[str, Any], code: str
) -> None:
    body = {"model": "glm-tts", "input": "hello", **extra}
    resp = await http.post(f"{emu.api_base}/audio/speech", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code


async def test_tts_max_input_ok(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_speech(http, emu, "x" * 1024)
    assert resp.status == 200


# --------------------------------------------------------------------------- failure modes

ERROR_CASES = [
    ("auth", 401, "1000"),
    ("forbidden", 403, "1220"),
    ("content", 400, "1301"),
    ("invalid", 400, "1214"),
    ("model", 400, "1211"),
    ("too-long", 400, "1261"),
    ("quota", 429, "1113"),
    ("rate", 429, "1302"),
    ("overload", 429, "1305"),
    ("server", 500, "500"),
    ("zhipu-500", 500, "1234"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("route", ["image", "speech"])
async def test_error_modes(
    emu: RunningEmulator, http: aiohttp.ClientSession, route: str, case: tuple[str, int, str]
) -> None:
    mode, status, code = case
    text = f"please fail [[{mode}]]"
    poster = post_image if route == "image" else post_speech
    resp = await poster(http, emu, text)
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if mode == "rate":
        assert resp.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in resp.headers
    if mode == "server":
        assert body == {"error": {"code": "500", "message": "Internal Error"}}
    assert emu.stats()["modes"] == {mode: 1}


async def test_rate_with_arg_and_limit(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    first = await post_image(http, emu, "limited [[rate*1:2]]")
    assert first.status == 429
    assert first.headers["Retry-After"] == "2"
    second = await post_image(http, emu, "limited [[rate*1:2]]")
    assert second.status == 200


async def test_header_mode_wins(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "text says [[server]]", headers={"X-Emulator-Mode": "quota"})
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "1113"
    resp = await post_image(http, emu, "plain", headers={"X-Emulator-Mode": "rate:5"})
    assert resp.headers["Retry-After"] == "5"


async def test_star_n_counting(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "retry me [[server*2]]"
    statuses = [(await post_image(http, emu, text)).status for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    stats = emu.stats()
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert stats["by_key"][digest] == 4
    assert stats["by_text"][text] == 4
    assert stats["modes"] == {"server": 2}
    assert stats["statuses"] == {"500": 2, "200": 2}
    # Other texts keep their own count.
    assert (await post_image(http, emu, "other [[server*2]]")).status == 500
    # Reset zeroes *N progress too.
    emu.reset()
    assert (await post_image(http, emu, text)).status == 500


async def test_by_text_is_truncated(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    text = "y" * 200
    await post_image(http, emu, text)
    assert emu.stats()["by_text"] == {"y" * 80: 1}


async def test_latency_marker(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert (await post_image(http, emu, "slow [[latency:0.3]]")).status == 200
    assert loop.time() - start >= 0.3
    start = loop.time()
    resp = await post_image(http, emu, "slow", headers={"X-Emulator-Latency": "0.2"})
    assert resp.status == 200
    assert loop.time() - start >= 0.2


async def test_hang_is_cancelled_on_disconnect(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post_image(http, emu, "stuck [[hang]]"), timeout=0.3)
    for _ in range(100):
        stats = emu.stats()
        if stats["concurrency"]["current"] == 0 and stats["cancelled"] >= 1:
            break
        await asyncio.sleep(0.02)
    stats = emu.stats()
    assert stats["concurrency"]["current"] == 0
    assert stats["cancelled"] >= 1
    assert stats["modes"] == {"hang": 1}


async def test_hang_with_arg_then_answers(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await post_speech(http, emu, "wait [[hang:0.2]]")
    assert resp.status == 200
    assert loop.time() - start >= 0.2


async def test_truncated(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[truncated]]")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(await resp.text())
    audio = await post_speech(http, emu, "cut [[truncated]]", response_format="wav")
    data = await audio.read()
    assert len(data) % 2 == 1
    declared = struct.unpack("<I", data[40:44])[0]
    assert declared > len(data) - 44
    json_audio = await post_speech(http, emu, "cut [[truncated]] [[json-audio]]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(await json_audio.text())


async def test_bad_b64(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[bad-b64]]")
    assert resp.status == 200
    value = (await resp.json())["data"][0]["b64_json"]
    with pytest.raises(binascii.Error):
        base64.b64decode(value, validate=True)
    with pytest.raises(binascii.Error):
        base64.b64decode(value)
    audio = await post_speech(http, emu, "[[bad-b64]]")
    with pytest.raises(binascii.Error):
        base64.b64decode((await audio.json())["audio_content"])


@pytest.mark.parametrize("route", ["image", "speech"])
async def test_wrong_type(emu: RunningEmulator, http: aiohttp.ClientSession, route: str) -> None:
    poster = post_image if route == "image" else post_speech
    resp = await poster(http, emu, "[[wrong-type]]")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert (await resp.text()).startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("route", ["image", "speech"])
async def test_json_error_200(emu: RunningEmulator, http: aiohttp.ClientSession, route: str) -> None:
    poster = post_image if route == "image" else post_speech
    resp = await poster(http, emu, "[[json-error-200]]")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == "1301"
    resp = await poster(http, emu, "[[json-error-200:1302]]")
    assert (await resp.json())["error"]["code"] == "1302"


async def test_huge(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[huge:1]]")
    assert resp.status == 200
    assert "Content-Length" not in resp.headers
    body = await resp.read()
    assert len(body) > 1024 * 1024
    assert len(json.loads(body)["data"][0]["b64_json"]) == 1024 * 1024
    audio = await post_speech(http, emu, "[[huge:0.5]]", response_format="wav")
    assert audio.headers["Content-Type"] == "audio/wav"
    data = await audio.read()
    assert data[:4] == b"RIFF" and len(data) == 44 + 512 * 1024


async def test_huge_default_can_be_abandoned(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[huge]]")
    first = await resp.content.read(64 * 1024)
    assert first.startswith(b'{"created":')
    resp.close()
    for _ in range(100):
        if emu.stats()["concurrency"]["current"] == 0:
            break
        await asyncio.sleep(0.02)
    assert emu.stats()["concurrency"]["current"] == 0


async def test_garbage(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[garbage]]")
    url = (await resp.json())["data"][0]["url"]
    file_resp = await http.get(url)
    assert file_resp.headers["Content-Type"] == "image/png"
    assert not (await file_resp.read()).startswith(PNG_SIGNATURE)
    b64 = await post_image(http, emu, "[[garbage]]", response_format="b64_json")
    raw = base64.b64decode((await b64.json())["data"][0]["b64_json"])
    assert not raw.startswith(PNG_SIGNATURE)
    audio = await post_speech(http, emu, "[[garbage]]", response_format="wav")
    assert audio.headers["Content-Type"] == "audio/wav"
    assert not (await audio.read()).startswith(b"RIFF")


@pytest.mark.parametrize("route", ["image", "speech"])
async def test_redirect(emu: RunningEmulator, http: aiohttp.ClientSession, route: str) -> None:
    poster = post_image if route == "image" else post_speech
    resp = await poster(http, emu, "[[redirect]]")
    assert resp.status == 302
    assert resp.headers["Location"] == "http://127.0.0.1:1/"


async def test_crash_answers_normally(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "poison [[crash]]")
    assert resp.status == 200
    assert emu.stats()["modes"] == {"crash": 1}


async def test_unknown_marker_is_ignored(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    resp = await post_image(http, emu, "[[not-a-mode]] hello")
    assert resp.status == 200
    assert emu.stats()["modes"] == {}


# --------------------------------------------------------------------------- auth, limits, stats


async def test_api_key(http: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency_min=0, latency_max=0, api_key="sk-test-key")
    assert "sk-test-key" not in repr(config)
    async with running_emulator(config) as emu:
        missing = await post_image(http, emu, "x")
        assert missing.status == 401
        assert (await missing.json())["error"]["code"] == "1001"
        wrong = await post_image(http, emu, "x", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        assert (await wrong.json())["error"]["code"] == "1000"
        ok = await post_image(http, emu, "x", headers={"Authorization": "Bearer sk-test-key"})
        assert ok.status == 200
        # File links are public, like the real temporary URLs.
        url = (await ok.json())["data"][0]["url"]
        assert (await http.get(url)).status == 200
        poll = await http.get(f"{emu.api_base}/async-result/abc")
        assert poll.status == 401


async def test_max_concurrency(http: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency_min=0.3, latency_max=0.3, max_concurrency=2)
    async with running_emulator(config) as emu:
        responses = await asyncio.gather(*(post_image(http, emu, f"c{i}") for i in range(3)))
        statuses = sorted(r.status for r in responses)
        assert statuses == [200, 200, 429]
        rejected = next(r for r in responses if r.status == 429)
        assert rejected.headers["Retry-After"] == "1"
        assert (await rejected.json())["error"]["code"] == "1302"
        stats = emu.stats()
        assert stats["concurrency"] == {"current": 0, "peak": 2, "limit": 2, "rejected": 1}


async def test_stats_and_reset_endpoints(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    assert await (await http.get(f"{emu.url}/healthz")).text() == "ok"
    await post_image(http, emu, "one")
    await post_speech(http, emu, "two [[quota]]")
    stats = await (await http.get(f"{emu.url}/_emulator/stats")).json()
    assert stats["calls"]["images.generations"] == 1
    assert stats["calls"]["audio.speech"] == 1
    assert stats["total_calls"] == 2
    assert stats["modes"] == {"quota": 1}
    assert stats["concurrency"]["peak"] == 1
    assert stats["by_key"][hashlib.sha256(b"one").hexdigest()] == 1
    assert stats == emu.stats()
    reset = await http.post(f"{emu.url}/_emulator/reset")
    assert reset.status == 200
    after = await (await http.get(f"{emu.url}/_emulator/stats")).json()
    assert after["total_calls"] == 0
    assert after["by_key"] == {} and after["by_text"] == {} and after["modes"] == {}


# --------------------------------------------------------------------------- gate


async def submit_async(http: aiohttp.ClientSession, emu: RunningEmulator, prompt: str) -> str:
    resp = await http.post(
        f"{emu.api_base}/async/images/generations", json={"model": "glm-image", "prompt": prompt}
    )
    assert resp.status == 200
    return str((await resp.json())["id"])


async def test_closed_gate_holds_every_generation_call_until_opened(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.close_gate()
    image_call = asyncio.create_task(post_image(http, emu, "held image"))
    speech_call = asyncio.create_task(post_speech(http, emu, "held voice"))
    async_call = asyncio.create_task(submit_async(http, emu, "held async"))
    calls = (image_call, speech_call, async_call)
    await emu.wait_held(3, timeout=10)
    assert emu.held == 3
    assert not any(call.done() for call in calls)
    stats = emu.stats()
    assert stats["gate"] == {"open": False, "held": 3}
    assert stats["concurrency"]["current"] == 3  # received and in flight, not yet answered
    assert stats["total_calls"] == 3
    emu.open_gate()
    image, speech, task_id = await asyncio.gather(image_call, speech_call, async_call)
    assert (image.status, speech.status) == (200, 200)
    assert task_id
    assert emu.held == 0
    assert emu.stats()["gate"] == {"open": True, "held": 0}


async def test_closed_gate_holds_async_task_progress(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    task_id = await submit_async(http, emu, "castle")
    emu.close_gate()
    poll = asyncio.create_task(http.get(f"{emu.api_base}/async-result/{task_id}"))
    await emu.wait_held(1, timeout=10)
    assert not poll.done()
    assert emu.state.tasks[task_id].polls == 0  # a held poll has not counted yet
    emu.open_gate()
    assert (await poll).status == 200
    _, final = await poll_until_done(http, emu, task_id)
    assert final["task_status"] == "SUCCESS"


async def test_calls_held_when_the_gate_opens_go_on_even_if_it_closes_again(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.close_gate()
    first = [asyncio.create_task(post_image(http, emu, f"first {i}")) for i in range(2)]
    await emu.wait_held(2, timeout=10)
    emu.open_gate()
    emu.close_gate()
    assert [r.status for r in await asyncio.gather(*first)] == [200, 200]
    late = asyncio.create_task(post_image(http, emu, "late"))
    await emu.wait_held(1, timeout=10)
    assert not late.done()
    emu.open_gate()
    assert (await late).status == 200


async def test_wait_held_times_out_when_nothing_is_held(emu: RunningEmulator) -> None:
    emu.close_gate()
    with pytest.raises(TimeoutError):
        await emu.wait_held(1, timeout=0.05)


async def test_a_held_call_whose_client_gives_up_leaves_the_count(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.close_gate()
    call = asyncio.create_task(post_image(http, emu, "abandoned"))
    await emu.wait_held(1, timeout=10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    def released() -> bool:
        stats = emu.stats()
        return bool(stats["gate"]["held"] == 0 and stats["concurrency"]["current"] == 0)

    await eventually(released, timeout=10)
    assert emu.stats()["cancelled"] == 1


async def test_gate_over_http(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    gate = f"{emu.url}/_emulator/gate"
    assert await (await http.get(gate)).json() == {"open": True, "held": 0}
    closed = await http.post(gate, json={"open": False})
    assert closed.status == 200
    assert await closed.json() == {"open": False, "held": 0}
    call = asyncio.create_task(post_speech(http, emu, "held over http"))

    async def one_held() -> bool:
        return bool((await (await http.get(gate)).json())["held"] == 1)

    await eventually(one_held, timeout=10)
    opened = await http.post(gate, json={"open": True})
    assert (await opened.json())["open"] is True
    assert (await call).status == 200
    for bad in ({"open": "no"}, {}, [False]):
        resp = await http.post(gate, json=bad)
        assert resp.status == 400
    assert (await http.post(gate, data=b"{not json")).status == 400
    assert emu.stats()["gate"] == {"open": True, "held": 0}


# --------------------------------------------------------------------------- process


async def test_cli_subprocess(http: aiohttp.ClientSession) -> None:
    env = {**os.environ, "CHARAI_EMULATOR_ADDR": "127.0.0.1:0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "charai.emulator",
        "--port",
        "0",
        "--latency",
        "0:0.01",
        "--api-key",
        "sk-secret-cli",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        announced = json.loads(line)
        assert announced["event"] == "emulator_listening"
        assert announced["url"].startswith("http://127.0.0.1:")
        assert announced["api_base"] == announced["url"] + "/api/paas/v4"
        assert await (await http.get(f"{announced['url']}/healthz")).text() == "ok"
        resp = await http.post(
            f"{announced['api_base']}/images/generations",
            json={"model": "cogview-4", "prompt": "cli"},
            headers={"Authorization": "Bearer sk-secret-cli"},
        )
        assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=10)
        assert code == 0
        assert proc.stderr is not None
        assert b"sk-secret-cli" not in await proc.stderr.read()
        assert await proc.stdout.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
