"""Request validation of the OpenAI dialect, per model, the way the real API refuses: unknown
arguments, unknown models (404 ``model_not_found``), sizes, qualities, formats, voices and
ranges, each in OpenAI's error envelope with ``param`` naming the field.

Why strict: a worker that sends a Zhipu-only field (``volume``, ``request_id``) or asks a GPT
image model for ``response_format`` works against a lax fake and fails against the real API;
the emulator must fail it first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from charai.emulator.modes import strip_markers
from charai.emulator.wire import openai_error

_COMMON_IMAGE_FIELDS = frozenset({"prompt", "model", "n", "quality", "size", "user", "stream"})
_DALLE_FIELDS = _COMMON_IMAGE_FIELDS | {"response_format"}
_GPT_IMAGE_FIELDS = _COMMON_IMAGE_FIELDS | {
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "partial_images",
}
IMAGE_FIELDS = _DALLE_FIELDS | _GPT_IMAGE_FIELDS | {"style"}
"""Every argument ``/v1/images/generations`` knows; anything else is "unrecognized"."""

SPEECH_FIELDS = frozenset(
    {"model", "input", "voice", "response_format", "speed", "instructions", "stream_format"}
)
"""Every argument ``/v1/audio/speech`` knows (no ``volume``: that is Zhipu's)."""

DEFAULT_IMAGE_MODEL = "dall-e-2"
"""What OpenAI uses when ``model`` is left out."""


@dataclass(frozen=True)
class ImageModel:
    """What one image model accepts."""

    sizes: tuple[str, ...]
    max_prompt: int
    qualities: tuple[str, ...]
    default_quality: str
    max_n: int
    fields: frozenset[str]
    gpt: bool


_GPT_IMAGE = ImageModel(
    sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
    max_prompt=32000,
    qualities=("low", "medium", "high", "auto"),
    default_quality="auto",
    max_n=10,
    fields=_GPT_IMAGE_FIELDS,
    gpt=True,
)

IMAGE_MODELS: dict[str, ImageModel] = {
    "dall-e-2": ImageModel(
        ("256x256", "512x512", "1024x1024"), 1000, ("standard",), "standard", 10, _DALLE_FIELDS, False
    ),
    "dall-e-3": ImageModel(
        ("1024x1024", "1792x1024", "1024x1792"),
        4000,
        ("standard", "hd"),
        "standard",
        1,
        _DALLE_FIELDS | {"style"},
        False,
    ),
    "gpt-image-1": _GPT_IMAGE,
    "gpt-image-1-mini": _GPT_IMAGE,
}

AUTO_SIZE = (1024, 1024)
"""What ``size: auto`` renders."""

TTS_MODELS: tuple[str, ...] = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
TTS_MAX_INPUT_CHARS = 4096
VOICES: tuple[str, ...] = (
    "alloy",
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
    "cedar",
)
SPEECH_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
PRODUCED_SPEECH_FORMATS: tuple[str, ...] = ("mp3", "wav", "pcm")
"""Formats the emulator can really encode; it refuses opus, aac and flac with a clear 400."""


@dataclass(frozen=True)
class OpenAIImageParams:
    """A validated ``/v1/images/generations`` request (defaults applied)."""

    model: str
    prompt: str
    size: str
    width: int
    height: int
    quality: str
    n: int
    b64: bool
    output_format: str
    gpt: bool


@dataclass(frozen=True)
class OpenAISpeechParams:
    """A validated ``/v1/audio/speech`` request (defaults applied, markers stripped from ``text``)."""

    model: str
    text: str
    voice: str
    response_format: str
    speed: float


def _bad(message: str, param: str | None, code: str | None = None) -> web.Response:
    return openai_error(400, message, param=param, code=code)


def _unrecognized(body: dict[str, Any], known: frozenset[str]) -> web.Response | None:
    extra = next((name for name in body if name not in known), None)
    if extra is None:
        return None
    return _bad(f"Unrecognized request argument supplied: {extra}", extra)


def model_not_found(model: str) -> web.Response:
    """OpenAI's 404 for a model that does not exist."""
    message = f"The model `{model}` does not exist or you do not have access to it."
    return openai_error(404, message, param=None, code="model_not_found")


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str | web.Response:
    value = body.get(name, default)
    if value not in allowed:
        options = ", ".join(f"'{option}'" for option in allowed)
        return _bad(f"Invalid value: {value!r}. Supported values are: {options}.", name, "invalid_value")
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_model(body: dict[str, Any]) -> tuple[str, ImageModel] | web.Response:
    """Unknown arguments, the model, and the arguments that model does not take."""
    unknown = _unrecognized(body, IMAGE_FIELDS)
    if unknown is not None:
        return unknown
    model = body.get("model", DEFAULT_IMAGE_MODEL)
    if not isinstance(model, str) or model not in IMAGE_MODELS:
        return model_not_found(str(model))
    spec = IMAGE_MODELS[model]
    foreign = next((name for name in body if name not in spec.fields), None)
    if foreign is not None:
        return _bad(f"Unknown parameter: '{foreign}'.", foreign, "unknown_parameter")
    return model, spec


def _gpt_options(body: dict[str, Any], output_format: str) -> web.Response | None:
    """``background``, ``moderation``, ``output_compression`` and ``partial_images`` of GPT image models."""
    background = _choice(body, "background", ("transparent", "opaque", "auto"), "auto")
    if isinstance(background, web.Response):
        return background
    if background == "transparent" and output_format == "jpeg":
        return _bad("Transparent background is not supported for jpeg output.", "background")
    moderation = _choice(body, "moderation", ("low", "auto"), "auto")
    if isinstance(moderation, web.Response):
        return moderation
    compression = body.get("output_compression", 100)
    if not _is_int(compression) or not 0 <= compression <= 100:
        return _bad("output_compression must be an integer from 0 to 100.", "output_compression")
    partial = body.get("partial_images", 0)
    if not _is_int(partial) or not 0 <= partial <= 3:
        return _bad("partial_images must be an integer from 0 to 3.", "partial_images")
    return None


def _image_formats(body: dict[str, Any], spec: ImageModel) -> tuple[bool, str] | web.Response:
    """(answer in base64, file format): GPT image models always answer base64 in their format."""
    if spec.gpt:
        output_format = _choice(body, "output_format", ("png", "jpeg", "webp"), "png")
        if isinstance(output_format, web.Response):
            return output_format
        refused = _gpt_options(body, output_format)
        return refused if refused is not None else (True, output_format)
    response_format = _choice(body, "response_format", ("url", "b64_json"), "url")
    if isinstance(response_format, web.Response):
        return response_format
    if "style" in body and body["style"] not in ("vivid", "natural"):
        return _bad(f"Invalid value: {body['style']!r}. Supported values are: 'vivid', 'natural'.", "style")
    return response_format == "b64_json", "png"


def _image_common(body: dict[str, Any], model: str, spec: ImageModel) -> tuple[str, str, int] | web.Response:
    """Prompt, size, quality, ``n``, ``user`` and ``stream``: (size, quality, n)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if len(prompt) > spec.max_prompt:
        message = f"'prompt' is too long: {len(prompt)} characters, {model} takes at most {spec.max_prompt}."
        return _bad(message, "prompt", "string_above_max_length")
    size = _choice(body, "size", spec.sizes, "auto" if spec.gpt else "1024x1024")
    if isinstance(size, web.Response):
        return size
    quality = _choice(body, "quality", spec.qualities, spec.default_quality)
    if isinstance(quality, web.Response):
        return quality
    count = body.get("n", 1)
    if not _is_int(count) or not 1 <= count <= spec.max_n:
        return _bad(f"n must be an integer from 1 to {spec.max_n} for {model}.", "n", "invalid_value")
    if "user" in body and not isinstance(body["user"], str):
        return _bad("user must be a string.", "user")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return _bad("stream must be a boolean.", "stream")
    if stream:
        return _bad("The emulator cannot stream images; leave stream false.", "stream")
    return size, quality, count


def validate_openai_image(body: dict[str, Any]) -> OpenAIImageParams | web.Response:
    """Check an image request like OpenAI does; return params or the error answer."""
    found = _image_model(body)
    if isinstance(found, web.Response):
        return found
    model, spec = found
    common = _image_common(body, model, spec)
    if isinstance(common, web.Response):
        return common
    formats = _image_formats(body, spec)
    if isinstance(formats, web.Response):
        return formats
    size, quality, count = common
    b64, output_format = formats
    width, height = AUTO_SIZE
    if size != "auto":
        across, _, down = size.partition("x")
        width, height = int(across), int(down)
    prompt = str(body["prompt"])
    return OpenAIImageParams(model, prompt, size, width, height, quality, count, b64, output_format, spec.gpt)


def _speech_text(body: dict[str, Any]) -> str | web.Response:
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if len(text) > TTS_MAX_INPUT_CHARS:
        message = f"'input' is too long: {len(text)} characters, the maximum is {TTS_MAX_INPUT_CHARS}."
        return _bad(message, "input", "string_above_max_length")
    return text


def _speech_format(body: dict[str, Any]) -> str | web.Response:
    response_format = _choice(body, "response_format", SPEECH_FORMATS, "mp3")
    if isinstance(response_format, web.Response):
        return response_format
    if response_format not in PRODUCED_SPEECH_FORMATS:
        message = (
            f"The emulator cannot produce {response_format} audio; "
            f"ask for one of {', '.join(PRODUCED_SPEECH_FORMATS)}."
        )
        return _bad(message, "response_format", "unsupported_format")
    return response_format


def validate_openai_speech(body: dict[str, Any]) -> OpenAISpeechParams | web.Response:
    """Check a speech request like OpenAI does; return params or the error answer."""
    unknown = _unrecognized(body, SPEECH_FIELDS)
    if unknown is not None:
        return unknown
    model = body.get("model")
    if model is None:
        return _bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or model not in TTS_MODELS:
        return model_not_found(str(model))
    text = _speech_text(body)
    if isinstance(text, web.Response):
        return text
    voice = body.get("voice")
    if voice is None:
        return _bad("Missing required parameter: 'voice'.", "voice", "missing_required_parameter")
    voice = _choice(body, "voice", VOICES, "")
    if isinstance(voice, web.Response):
        return voice
    response_format = _speech_format(body)
    if isinstance(response_format, web.Response):
        return response_format
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or isinstance(speed, bool) or not math.isfinite(speed):
        return _bad("speed must be a number from 0.25 to 4.0.", "speed")
    if not 0.25 <= speed <= 4.0:
        return _bad(f"speed {speed} is out of range: it must be from 0.25 to 4.0.", "speed", "invalid_value")
    if "instructions" in body and not isinstance(body["instructions"], str):
        return _bad("instructions must be a string.", "instructions")
    stream_format = _choice(body, "stream_format", ("audio", "sse"), "audio")
    if isinstance(stream_format, web.Response):
        return stream_format
    if stream_format == "sse":
        return _bad("The emulator cannot stream speech as sse; use stream_format audio.", "stream_format")
    return OpenAISpeechParams(model, strip_markers(text), voice, response_format, float(speed))
