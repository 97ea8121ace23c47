"""The TTS job: ask the provider (GLM-TTS or an OpenAI-compatible ``audio/speech``) for speech,
check it is audio, convert it to the requested format where the provider cannot produce it,
copy it into charai's store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from charai.core.domain import errors, provider_models, usage
from charai.core.domain.errors import ErrorKind, ProviderFailure
from charai.core.domain.states import PROGRESS_PROCESSING, Stage
from charai.tasks.v1 import task_pb2
from charai.tts_worker.audio import (
    DEFAULT_RATE,
    BadAudioError,
    apply_gain,
    encode_mp3,
    looks_like_json,
    mp3_info,
    pcm_duration,
    pcm_to_wav,
    wav_to_pcm,
)
from charai.worker.answers import decode_base64, raise_inband_error
from charai.worker.context import JobContext, advancing_progress
from charai.worker.provider import ProviderError

FORMATS = ("wav", "pcm", "mp3")
DEFAULT_VOICE = "tongtong"
"""GLM-TTS's default voice; sent when the payload names none, since the API requires ``voice``."""
DEFAULT_OPENAI_VOICE = "alloy"
"""The voice sent to an OpenAI-compatible API when the payload names none (``voice`` is required)."""

WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
MP3_TYPES = frozenset({"audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mpeg"})
PCM_TYPES = frozenset({"audio/pcm", "audio/l16", "audio/x-pcm", "audio/raw", "audio/basic"})
NOT_AUDIO_PREFIXES = ("text/", "image/", "video/", "application/json", "application/xml", "application/xhtml")

EXTENSIONS = {"wav": "wav", "pcm": "pcm", "mp3": "mp3"}
#: Audio up to this size is turned into WAV or PCM on the event loop (a header and a copy:
#: cheaper than the hop to a thread and back); MP3 encoding and gain always go to a thread.
INLINE_FINISH_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Pcm:
    """Decoded 16-bit little-endian samples and their format."""

    data: bytes
    rate: int
    channels: int
    width: int = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """Audio ready to store."""

    data: bytes
    extension: str
    content_type: str
    duration_seconds: float


def decode_audio(data: bytes, content_type: str, asked: str) -> Pcm | bytes:
    """Turns a provider's audio bytes into PCM, or returns them unchanged if they are MP3.

    The bytes decide over the content type where they can (a RIFF header is a WAV whatever the
    header says); raw PCM has no signature, so it is accepted only where PCM was asked for or
    the content type says PCM, and never under a text, image or JSON content type.

    Args:
        data: The audio bytes.
        content_type: Their media type, lower case without parameters; "" if unknown (base64
            inside JSON).
        asked: The format requested from the provider: ``wav``, ``pcm`` or ``mp3`` (then MPEG
            frames without an ID3 tag and without an MPEG content type are taken too).

    Raises:
        BadAudioError: The bytes are not usable audio.
    """
    if not data:
        raise BadAudioError("the audio is empty")
    if data[:4] == b"RIFF" or content_type in WAV_TYPES:
        pcm, rate, channels, width = wav_to_pcm(data)
        return Pcm(pcm, rate, channels, width)
    frame_sync = len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0
    if content_type in MP3_TYPES or data[:3] == b"ID3" or (asked == "mp3" and frame_sync):
        mp3_info(data)  # validates the frames
        return data
    if content_type.startswith(NOT_AUDIO_PREFIXES):
        raise BadAudioError(f"the answer is {content_type}, not audio")
    if asked == "pcm" or content_type in PCM_TYPES:
        pcm_duration(data, DEFAULT_RATE)  # validates: non-empty, whole 16-bit samples
        return Pcm(data, DEFAULT_RATE, 1)
    raise BadAudioError(
        f"expected a WAV file, got {content_type or 'unknown'} data starting {data[:8].hex()}"
    )


def convert(audio: Pcm | bytes, requested: str) -> Encoded:
    """Produces the requested format and its duration, computed from the samples themselves.

    Raises:
        BadAudioError: The audio cannot be converted (e.g. MP3 when WAV was requested).
    """
    if isinstance(audio, bytes):
        if requested != "mp3":
            raise BadAudioError(f"the provider sent MP3, which cannot be turned into {requested}")
        return Encoded(audio, "mp3", "audio/mpeg", mp3_info(audio).duration_seconds)
    duration = pcm_duration(audio.data, audio.rate, audio.width, audio.channels)
    if requested == "wav":
        return Encoded(
            pcm_to_wav(audio.data, audio.rate, audio.channels, audio.width), "wav", "audio/wav", duration
        )
    if requested == "pcm":
        content_type = f"audio/L16;rate={audio.rate};channels={audio.channels}"
        return Encoded(audio.data, "pcm", content_type, duration)
    return Encoded(encode_mp3(audio.data, audio.rate, audio.channels), "mp3", "audio/mpeg", duration)


@dataclasses.dataclass(frozen=True, slots=True)
class SpeechRequest:
    """One ``audio/speech`` call and what to do with its answer.

    Attributes:
        body: The JSON request.
        asked: The format asked of the provider (``wav``, ``pcm`` or ``mp3``).
        gain: Volume to apply to the samples here (1: none), for a provider without ``volume``.
    """

    body: dict[str, Any]
    asked: str
    gain: float = 1.0


def speech_request(dialect: str, model: str, payload: task_pb2.TtsPayload, requested: str) -> SpeechRequest:
    """The provider call for ``payload`` in ``dialect``: ask for the format the client wants when
    the provider produces it, convert only when it cannot.

    GLM-TTS produces wav and pcm and takes ``volume``: mp3 is asked as wav and encoded here.
    OpenAI produces wav, pcm and mp3 but has no ``volume``: a volume other than 1 is applied to
    the samples here, so then wav is asked (self-describing samples) and encoded as requested.
    """
    speed = payload.speed if payload.HasField("speed") else 1.0
    volume = payload.volume if payload.HasField("volume") else 1.0
    rules = provider_models.tts_model(dialect, model)
    openai = dialect == provider_models.OPENAI
    gain = volume if openai else 1.0  # OpenAI has no volume: applied to the samples here
    # GLM-TTS has no mp3, and a gain needs samples: then wav is asked and encoded here.
    asked = requested if requested in rules.native_formats and gain == 1.0 else "wav"
    body: dict[str, Any] = {
        "model": model,
        "input": payload.text,
        "voice": payload.voice_style or (DEFAULT_OPENAI_VOICE if openai else DEFAULT_VOICE),
        "response_format": asked,
        "speed": speed,
    }
    if not openai:
        body["volume"] = volume
    return SpeechRequest(body, asked, gain)


def finishes_inline(data: bytes, plan: SpeechRequest, requested: str) -> bool:
    """Whether :func:`finish` is a copy, not work: no gain, WAV or PCM asked and answered, and a
    clip of at most :data:`INLINE_FINISH_BYTES`."""
    return plan.gain == 1.0 and requested in ("wav", "pcm") and len(data) <= INLINE_FINISH_BYTES


def finish(data: bytes, content_type: str, plan: SpeechRequest, requested: str) -> Encoded:
    """The provider's answer as the requested format: decoded, gain applied, converted."""
    audio = decode_audio(data, content_type, plan.asked)
    if plan.gain != 1.0:
        if not isinstance(audio, Pcm):
            raise BadAudioError(f"the provider sent MP3 when {plan.asked} was asked; cannot apply the volume")
        audio = dataclasses.replace(audio, data=apply_gain(audio.data, plan.gain))
    return convert(audio, requested)


class TtsHandler:
    """Runs TTS jobs against GLM-TTS or an OpenAI-compatible API (``POST /audio/speech``,
    non-streaming; ``ProviderConfig.dialect`` decides the request, :func:`speech_request`).

    Args:
        expected_seconds: Typical synthesis time; shapes the progress curve only.
    """

    kind = "tts"

    def __init__(self, *, expected_seconds: float = 5.0):
        self._expected_seconds = expected_seconds

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        """Synthesises, validates, converts and stores one clip; raises ProviderError on failure."""
        payload = ctx.task.tts
        requested = (payload.response_format or "wav").strip().lower()
        if requested not in FORMATS:
            # The gateway validates this; a task that still carries it cannot succeed on retry.
            message = f"unsupported response_format {payload.response_format!r}; use wav, pcm or mp3"
            raise ProviderError(ProviderFailure(ErrorKind.INVALID_REQUEST, message))
        config = ctx.provider.config
        plan = speech_request(config.dialect, config.model, payload, requested)
        async with advancing_progress(ctx, self._expected_seconds):
            response = await ctx.provider.request("POST", "/audio/speech", json_body=plan.body)
            data, content_type = await _audio_bytes(ctx, response.body, response.content_type)
        config = ctx.provider.config  # the provider answered with audio: the call is charged
        try:
            if finishes_inline(data, plan, requested):
                encoded = finish(data, content_type, plan, requested)
            else:  # MP3 encoding and gain take CPU time in proportion to the clip: not on the loop
                encoded = await asyncio.to_thread(finish, data, content_type, plan, requested)
        except BadAudioError as exc:
            _charged_without_audio(ctx)
            raise ProviderError(errors.bad_response(str(exc))) from None
        ctx.meter(usage.speech_call(config.dialect, config.model, payload.text, encoded.duration_seconds))
        await ctx.progress(PROGRESS_PROCESSING, Stage.PROCESSING)
        ref = await ctx.store_media(encoded.data, encoded.extension, encoded.content_type)
        result = task_pb2.TtsResult(
            audio_url=ref.url,
            text=payload.text,
            voice_style=str(plan.body["voice"]),
            duration_seconds=encoded.duration_seconds,
            content_type=encoded.content_type,
            size_bytes=len(encoded.data),
        )
        result.generated_at.GetCurrentTime()
        return result


def _charged_without_audio(ctx: JobContext) -> None:
    """The provider made (and charges for) the clip its answer carries or links to, but no audio
    came of it (it does not decode, its base64 is broken, its download failed): metered with
    no seconds of audio."""
    config = ctx.provider.config
    ctx.meter(usage.speech_call(config.dialect, config.model, ctx.task.tts.text, 0.0))


async def _audio_bytes(ctx: JobContext, body: bytes, content_type: str) -> tuple[bytes, str]:
    """The audio an answer carries: the body itself, or what a JSON answer points to.

    A JSON answer is an in-band error (classified like an HTTP error), base64 ``audio_content``,
    or an ``audio_url`` that is downloaded now (provider URLs expire).
    """
    if not looks_like_json(body, content_type):
        return body, content_type
    try:
        answer: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        if content_type.endswith("json"):
            raise ProviderError(errors.bad_response("the body is not valid JSON")) from None
        return body, content_type  # raw audio that merely starts with "{" and ends with "}"
    if not isinstance(answer, dict):
        raise ProviderError(errors.bad_response(f"expected a JSON object, got {type(answer).__name__}"))
    raise_inband_error(answer, ctx.provider)
    content, url = answer.get("audio_content"), answer.get("audio_url")
    try:
        if content:
            return decode_base64(content, cap=ctx.provider.config.max_body_bytes, what="audio_content"), ""
        if isinstance(url, str) and url:
            downloaded = await ctx.provider.download(url)
            return downloaded.body, downloaded.content_type
    except ProviderError:
        _charged_without_audio(ctx)  # broken base64, too large, a failed download
        raise
    raise ProviderError(errors.bad_response("the JSON answer carries no audio_content or audio_url"))
