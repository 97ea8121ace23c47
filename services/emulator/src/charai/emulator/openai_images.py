"""The OpenAI image route, ``POST /v1/images/generations``: dall-e models answer a URL (served
from ``/files``, like OpenAI's 60-minute links) or ``b64_json``; GPT image models always answer
``b64_json`` in their ``output_format`` and report token ``usage``. The failure modes are the
same as the Zhipu side's, answered in OpenAI's error envelope."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import time
from typing import Any

from aiohttp import web
from charai.emulator import encode
from charai.emulator.calls import Call, base_url, provider_call
from charai.emulator.dialects import OPENAI
from charai.emulator.failures import (
    BAD_B64_PNG,
    HUGE_PLACEHOLDER,
    delivers_normally,
    huge_bytes,
    simulate_generation,
    stream_huge_json,
    truncated_json,
)
from charai.emulator.modes import Marker, strip_markers
from charai.emulator.openai_validation import OpenAIImageParams, validate_openai_image
from charai.emulator.state import EmulatorState
from charai.emulator.wire import json_response

ROUTE = "openai.images.generations"

_OUTPUT_TOKENS: dict[str, tuple[int, int]] = {
    "low": (272, 408),
    "medium": (1056, 1584),
    "high": (4160, 6240),
}
"""Output tokens per GPT image by quality: (square, portrait or landscape), from OpenAI's
pricing page; ``auto`` counts as medium. Approximate: the emulator bills nobody."""


def _usage(params: OpenAIImageParams) -> dict[str, Any]:
    """The ``usage`` block GPT image models answer with (tokens, not money)."""
    square, oblong = _OUTPUT_TOKENS.get(params.quality, _OUTPUT_TOKENS["medium"])
    per_image = square if params.width == params.height else oblong
    text_tokens = math.ceil(len(params.prompt) / 4)
    output_tokens = per_image * params.n
    return {
        "input_tokens": text_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
        "output_tokens": output_tokens,
        "total_tokens": text_tokens + output_tokens,
    }


def _seed(state: EmulatorState, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{state.config.seed}:{strip_markers(prompt)}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


async def _item(
    request: web.Request, state: EmulatorState, params: OpenAIImageParams, index: int, mode: Marker | None
) -> dict[str, str]:
    """One ``data`` entry: a real image (or garbage bytes) as base64 or a ``/files`` URL."""
    if mode is not None and mode.name == "bad-b64":
        return {"b64_json": BAD_B64_PNG}
    fmt = params.output_format
    if mode is not None and mode.name == "garbage":
        data = state.garbage()
    else:
        seed = _seed(state, params.prompt, index)
        data = await asyncio.to_thread(encode.make_image, params.width, params.height, seed, fmt)
    if params.b64:
        return {"b64_json": base64.b64encode(data).decode("ascii")}
    return {"url": state.store_file(data, fmt, encode.IMAGE_TYPES[fmt], base_url(request, state))}


def _note_request(call: Call, params: OpenAIImageParams) -> None:
    """The effective request in the call log (defaults applied)."""
    record = call.record
    record.model, record.size, record.quality, record.n = params.model, params.size, params.quality, params.n
    record.width, record.height = params.width, params.height
    record.response_format = "b64_json" if params.b64 else "url"
    record.output_format = params.output_format


async def _image_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_openai_image(call.body)
    if isinstance(params, web.Response):
        return params
    _note_request(call, params)
    answered = await simulate_generation(state, call)
    if answered is not None:
        return answered
    created = int(time.time())
    mode = call.mode
    if mode is not None and mode.name == "huge":
        placeholder = {"created": created, "data": [{"b64_json": HUGE_PLACEHOLDER}]}
        return await stream_huge_json(request, placeholder, huge_bytes(mode))
    items: list[dict[str, str]] = []
    for index in range(params.n):
        item = await _item(request, state, params, index, mode)
        if params.model == "dall-e-3":
            item["revised_prompt"] = strip_markers(params.prompt).strip()
        items.append(item)
    payload: dict[str, Any] = {"created": created, "data": items}
    if params.gpt:
        payload["usage"] = _usage(params)
    if mode is not None and mode.name == "truncated":
        return truncated_json(payload)
    if delivers_normally(mode):
        call.record.images = len(items)
    return json_response(payload)


async def handle_openai_image(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/generations``: validate, wait the latency, return ``n`` images."""
    return await provider_call(request, ROUTE, "prompt", _image_impl, OPENAI)
