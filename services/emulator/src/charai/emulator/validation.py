"""Request validation the way the real API does it: models, sizes, formats and ranges, each
refusal in Zhipu's 400 envelope with its string code."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from charai.emulator.modes import strip_markers
from charai.emulator.wire import invalid, zhipu_error

IMAGE_MODELS: tuple[str, ...] = ("glm-image", "cogview-4-250304", "cogview-4", "cogview-3-flash")
ASYNC_IMAGE_MODELS: tuple[str, ...] = ("glm-image",)
TTS_MODELS: tuple[str, ...] = ("glm-tts",)
TTS_MAX_INPUT_CHARS = 1024

GLM_IMAGE_RECOMMENDED = frozenset(
    {(1280, 1280), (1568, 1056), (1056, 1568), (1472, 1088), (1088, 1472), (1728, 960), (960, 1728)}
)
COGVIEW_RECOMMENDED = frozenset(
    {(1024, 1024), (768, 1344), (864, 1152), (1344, 768), (1152, 864), (1440, 720), (720, 1440)}
)

_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_VOICES_NOTE = "any non-empty string: built-in voices or a cloned-voice id"


@dataclass(frozen=True)
class ImageParams:
    """A validated image request."""

    model: str
    prompt: str
    width: int
    height: int
    b64: bool


@dataclass(frozen=True)
class SpeechParams:
    """A validated GLM-TTS request."""

    text: str
    response_format: str
    speed: float
    volume: float
    stream: bool
    encode_format: str


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _valid_size(model: str, width: int, height: int) -> bool:
    """The documented custom-size rules, plus the recommended sizes that break them."""
    if model == "glm-image":
        if (width, height) in GLM_IMAGE_RECOMMENDED:
            return True
        return (
            1024 <= width <= 2048
            and 1024 <= height <= 2048
            and width % 32 == 0
            and height % 32 == 0
            and width * height <= 2**22
        )
    if (width, height) in COGVIEW_RECOMMENDED:
        return True
    return (
        512 <= width <= 2048
        and 512 <= height <= 2048
        and width % 16 == 0
        and height % 16 == 0
        and width * height <= 2**21
    )


def validate_image(body: dict[str, Any], *, async_route: bool) -> ImageParams | web.Response:
    """Check an image request like the real API; return params or the 400 answer."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return invalid("model is required")
    if model not in IMAGE_MODELS:
        return zhipu_error(400, "1211", "Unknown Model, please check the model code.")
    if async_route and model not in ASYNC_IMAGE_MODELS:
        return zhipu_error(400, "1211", f"model {model} does not support async")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return invalid("prompt is required")
    size = body.get("size")
    if size is None:
        size = "1280x1280" if model == "glm-image" else "1024x1024"
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if match is None:
        return invalid(f"size must look like 1024x1024, got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not _valid_size(model, width, height):
        return invalid(f"size {size} is not supported by {model}")
    quality = body.get("quality")
    if quality is not None and quality not in ("hd", "standard"):
        return invalid("quality must be hd or standard")
    response_format = body.get("response_format")
    if response_format is not None and response_format not in ("url", "b64_json"):
        return invalid("response_format must be url or b64_json")
    count = body.get("n")
    if count is not None and (isinstance(count, bool) or count != 1):
        return invalid("n must be 1")
    watermark = body.get("watermark_enabled")
    if watermark is not None and not isinstance(watermark, bool):
        return invalid("watermark_enabled must be a boolean")
    user_id = body.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not 6 <= len(user_id) <= 128):
        return invalid("user_id must be 6-128 characters")
    return ImageParams(model, prompt, width, height, response_format == "b64_json")


def validate_speech(body: dict[str, Any]) -> SpeechParams | web.Response:
    """Check a GLM-TTS request like the real API; return params or the 400 answer."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return invalid("model is required")
    if model not in TTS_MODELS:
        return zhipu_error(400, "1211", "Unknown Model, please check the model code.")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return invalid("input is required")
    if len(text) > TTS_MAX_INPUT_CHARS:
        return zhipu_error(400, "1261", f"input exceeds {TTS_MAX_INPUT_CHARS} characters")
    voice = body.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        return invalid(f"voice must be {_VOICES_NOTE}")
    response_format = body.get("response_format", "pcm")
    if response_format not in ("wav", "pcm"):
        return invalid("response_format must be wav or pcm")
    speed = body.get("speed", 1.0)
    if not _is_number(speed) or not 0.5 <= speed <= 2.0:
        return invalid("speed must be within [0.5, 2]")
    volume = body.get("volume", 1.0)
    if not _is_number(volume) or not 0 < volume <= 10:
        return invalid("volume must be within (0, 10]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return invalid("stream must be a boolean")
    if stream and response_format != "pcm":
        return invalid("streaming supports only pcm")
    encode_format = body.get("encode_format", "base64")
    if encode_format not in ("base64", "hex"):
        return invalid("encode_format must be base64 or hex")
    watermark = body.get("watermark_enabled")
    if watermark is not None and not isinstance(watermark, bool):
        return invalid("watermark_enabled must be a boolean")
    return SpeechParams(
        strip_markers(text), response_format, float(speed), float(volume), stream, encode_format
    )
