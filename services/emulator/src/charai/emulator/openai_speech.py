"""The OpenAI speech route, ``POST /v1/audio/speech``: raw audio bytes (mp3 by default, or wav
or pcm: 24 kHz s16le mono) with the failure modes applied to the audio, errors in OpenAI's
envelope."""

from __future__ import annotations

import asyncio

from aiohttp import web
from charai.emulator import encode, media
from charai.emulator.calls import Call, provider_call
from charai.emulator.dialects import OPENAI
from charai.emulator.failures import delivers_normally, huge_bytes, simulate_generation
from charai.emulator.openai_validation import validate_openai_speech
from charai.emulator.state import EmulatorState
from charai.emulator.wire import stream_body

ROUTE = "openai.audio.speech"


async def _mode_answer(
    request: web.Request, state: EmulatorState, call: Call, content_type: str
) -> web.StreamResponse | None:
    """``huge`` (a body of that size, with a WAV header for wav) and ``garbage``/``bad-b64``
    (random non-audio bytes: this route has no base64 to spoil), else ``None``."""
    mode = call.mode
    if mode is None:
        return None
    if mode.name == "huge":
        size = huge_bytes(mode)
        header = media.wav_header(media.DEFAULT_SAMPLE_RATE, size) if content_type == "audio/wav" else b""
        return await stream_body(
            request, content_type, prefix=header, filler=size, fill_byte=b"\x00", suffix=b""
        )
    if mode.name in ("garbage", "bad-b64"):
        return web.Response(body=state.garbage(), content_type=content_type)
    return None


async def _speech_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_openai_speech(call.body)
    if isinstance(params, web.Response):
        return params
    record = call.record
    record.model, record.voice, record.speed = params.model, params.voice, params.speed
    record.response_format = params.response_format
    answered = await simulate_generation(state, call)
    if answered is not None:
        return answered
    content_type = encode.AUDIO_TYPES[params.response_format]
    special = await _mode_answer(request, state, call, content_type)
    if special is not None:
        return special
    rate = media.DEFAULT_SAMPLE_RATE
    text, speed, fmt = params.text, params.speed, params.response_format
    if fmt == "mp3":  # encoding costs CPU in proportion to the clip: always in a thread
        audio = await asyncio.to_thread(encode.make_speech, text, speed, fmt, rate)
    else:  # WAV and PCM as the Zhipu route renders them
        audio = await media.render_speech(encode.make_speech, text, speed, fmt, rate)
    if call.mode is not None and call.mode.name == "truncated":
        audio = audio[: len(audio) // 2 + 1]  # odd length: cut mid-frame, not whole samples either
    elif delivers_normally(call.mode):
        record.audio_seconds = media.sample_count(params.text, params.speed, rate) / rate
        record.audio_bytes = len(audio)
    return web.Response(body=audio, content_type=content_type)


async def handle_openai_speech(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/speech``: raw audio bytes of the requested format."""
    return await provider_call(request, ROUTE, "input", _speech_impl, OPENAI)
