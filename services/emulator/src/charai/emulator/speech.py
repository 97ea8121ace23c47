"""The GLM-TTS route: raw wav/pcm audio, or on request a JSON body (``[[json-audio]]``,
``[[json-audio-url]]``) or an SSE stream, with the failure modes applied to audio."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from aiohttp import web
from charai.emulator import media
from charai.emulator.calls import Call, base_url, provider_call
from charai.emulator.failures import (
    BAD_B64_WAV,
    delivers_normally,
    huge_bytes,
    simulate_generation,
    truncated_json,
)
from charai.emulator.state import EmulatorState
from charai.emulator.validation import SpeechParams, validate_speech
from charai.emulator.wire import dumps, json_response, stream_body

log = logging.getLogger("charai.emulator")


def _stream_event(call: Call, content: str, created: int, last: bool) -> dict[str, Any]:
    """One SSE event in the SDK's ``choices[].delta.content`` shape."""
    return {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "role": "assistant",
                    "content": content,
                    "return_sample_rate": media.DEFAULT_SAMPLE_RATE,
                },
                "finish_reason": "stop" if last else None,
            }
        ],
        "created": created,
        "request_id": call.request_id,
    }


async def _speech_stream(request: web.Request, call: Call, params: SpeechParams) -> web.StreamResponse:
    """SSE answer in the SDK's ``choices[].delta.content`` shape, ending with ``[DONE]``.

    The ``truncated`` mode stops mid-event without ``[DONE]``.
    """
    pcm = await media.render_speech(media.make_pcm, params.text, params.speed, 24000, params.volume)
    response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    created = int(time.time())
    step = 2 * 4800  # 0.2 s of 24 kHz s16le per event
    pieces = [pcm[i : i + step] for i in range(0, len(pcm), step)] or [b""]
    truncated = call.mode is not None and call.mode.name == "truncated"
    try:
        for index, piece in enumerate(pieces):
            content = (
                piece.hex() if params.encode_format == "hex" else base64.b64encode(piece).decode("ascii")
            )
            event = _stream_event(call, content, created, last=index == len(pieces) - 1)
            line = f"data: {dumps(event)}\n\n".encode()
            if truncated and index >= len(pieces) // 2:
                await response.write(line[: len(line) // 2])
                return response
            await response.write(line)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        if delivers_normally(call.mode):
            _note_audio(call, params, len(pcm))
    except ConnectionError:
        log.debug("client went away during a TTS stream")
    return response


async def _audio_mode_answer(
    request: web.Request, state: EmulatorState, call: Call, content_type: str
) -> web.StreamResponse | None:
    """The ``huge``, ``garbage`` and ``bad-b64`` answers of the audio route, else ``None``."""
    name = call.mode.name if call.mode else None
    if name == "huge":
        assert call.mode is not None
        size = huge_bytes(call.mode)
        header = media.wav_header(media.DEFAULT_SAMPLE_RATE, size) if content_type == "audio/wav" else b""
        return await stream_body(
            request, content_type, prefix=header, filler=size, fill_byte=b"\x00", suffix=b""
        )
    if name == "garbage":
        return web.Response(body=state.garbage(), content_type=content_type)
    if name == "bad-b64":
        return json_response({"audio_content": BAD_B64_WAV})
    return None


async def _json_audio(
    request: web.Request, state: EmulatorState, call: Call, params: SpeechParams
) -> web.Response | None:
    """The JSON variants (``[[json-audio-url]]``, ``[[json-audio]]``) of a WAV, else ``None``."""
    if not (call.directives.json_audio_url or call.directives.json_audio):
        return None
    wav = await media.render_speech(
        media.make_wav, params.text, params.speed, media.DEFAULT_SAMPLE_RATE, params.volume
    )
    if call.directives.json_audio_url:
        url = state.store_file(wav, "wav", "audio/wav", base_url(request, state))
        payload = {"audio_url": url}
    else:
        payload = {"audio_content": base64.b64encode(wav).decode("ascii")}
    truncated = call.mode is not None and call.mode.name == "truncated"
    if not truncated and delivers_normally(call.mode):
        _note_audio(call, params, len(wav))
    return truncated_json(payload) if truncated else json_response(payload)


def _note_audio(call: Call, params: SpeechParams, size: int) -> None:
    """What a complete answer delivered, in the call log."""
    rate = media.DEFAULT_SAMPLE_RATE
    call.record.audio_seconds = media.sample_count(params.text, params.speed, rate) / rate
    call.record.audio_bytes = size


async def _speech_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_speech(call.body)
    if isinstance(params, web.Response):
        return params
    call.record.response_format, call.record.speed = params.response_format, params.speed
    answered = await simulate_generation(state, call)
    if answered is not None:
        return answered
    if params.stream:
        return await _speech_stream(request, call, params)
    content_type = "audio/wav" if params.response_format == "wav" else "audio/pcm"
    special = await _audio_mode_answer(request, state, call, content_type)
    if special is None:
        special = await _json_audio(request, state, call, params)
    if special is not None:
        return special
    maker = media.make_wav if params.response_format == "wav" else media.make_pcm
    audio = await media.render_speech(
        maker, params.text, params.speed, media.DEFAULT_SAMPLE_RATE, params.volume
    )
    if call.mode is not None and call.mode.name == "truncated":
        audio = audio[: len(audio) // 2 + 1]  # odd length: not whole s16 samples either
    elif delivers_normally(call.mode):
        _note_audio(call, params, len(audio))
    return web.Response(body=audio, content_type=content_type)


async def handle_speech(request: web.Request) -> web.StreamResponse:
    """``POST /audio/speech``: raw wav/pcm bytes (or JSON/SSE variants on request)."""
    return await provider_call(request, "audio.speech", "input", _speech_impl)
