"""The Zhipu image routes: synchronous generation, and the async submit plus the
``async-result`` polling that ends a GLM-Image task."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from charai.emulator import media
from charai.emulator.calls import Call, auth_error, base_url, provider_call
from charai.emulator.failures import (
    BAD_B64_PNG,
    HUGE_PLACEHOLDER,
    apply_front_mode,
    delivers_normally,
    generic_body_mode,
    huge_bytes,
    simulate_generation,
    stream_huge_json,
    truncated_json,
)
from charai.emulator.modes import ASYNC_TASK_FAIL_MODES, ERROR_MODES, Marker, error_body, strip_markers
from charai.emulator.state import STATE_KEY, AsyncTask, EmulatorState
from charai.emulator.validation import ImageParams, validate_image
from charai.emulator.wire import json_response, zhipu_error

_Build = Callable[[list[dict[str, str]]], dict[str, Any]]


def _image_seed(state: EmulatorState, prompt: str) -> int:
    digest = hashlib.sha256(f"{state.config.seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


async def _image_items(
    request: web.Request, state: EmulatorState, params: ImageParams, mode: Marker | None
) -> list[dict[str, str]]:
    """The ``data``/``image_result`` list: a URL or base64 of a real (or garbage) PNG."""
    name = mode.name if mode else None
    if name == "bad-b64":
        return [{"b64_json": BAD_B64_PNG}]
    if name == "garbage":
        data = state.garbage()
    else:
        seed = _image_seed(state, strip_markers(params.prompt))
        data = await asyncio.to_thread(media.make_png, params.width, params.height, seed)
    if params.b64:
        return [{"b64_json": base64.b64encode(data).decode("ascii")}]
    return [{"url": state.store_file(data, "png", "image/png", base_url(request, state))}]


async def _image_answer(
    request: web.Request,
    state: EmulatorState,
    *,
    mode: Marker | None,
    items: list[dict[str, str]] | None,
    params: ImageParams,
    build: _Build,
) -> tuple[web.StreamResponse, list[dict[str, str]] | None]:
    """Final image answer, with truncated/huge/bad-b64/garbage applied."""
    name = mode.name if mode else None
    if name == "huge":
        payload = build([{"b64_json": HUGE_PLACEHOLDER}])
        assert mode is not None
        return await stream_huge_json(request, payload, huge_bytes(mode)), None
    if items is None:
        items = await _image_items(request, state, params, mode)
    payload = build(items)
    if name == "truncated":
        return truncated_json(payload), items
    return json_response(payload), items


def _note_request(call: Call, params: ImageParams) -> None:
    """The effective request in the call log (size and response format with defaults applied)."""
    record = call.record
    record.model, record.size, record.n = params.model, f"{params.width}x{params.height}", 1
    record.width, record.height = params.width, params.height
    record.response_format = "b64_json" if params.b64 else "url"


async def _sync_image_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_image(call.body, async_route=False)
    if isinstance(params, web.Response):
        return params
    _note_request(call, params)
    answered = await simulate_generation(state, call)
    if answered is not None:
        return answered
    created = int(time.time())

    def build(items: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "created": created,
            "data": items,
            "content_filter": [{"role": "assistant", "level": 3}],
        }

    if call.mode is not None and call.mode.name == "bad-b64":
        params = ImageParams(params.model, params.prompt, params.width, params.height, True)
    response, _ = await _image_answer(request, state, mode=call.mode, items=None, params=params, build=build)
    if delivers_normally(call.mode):
        call.record.images = 1
    return response


async def handle_image_sync(request: web.Request) -> web.StreamResponse:
    """``POST /images/generations``: validate, wait the latency, return one image."""
    return await provider_call(request, "images.generations", "prompt", _sync_image_impl)


async def _async_submit_impl(request: web.Request, state: EmulatorState, call: Call) -> web.StreamResponse:
    params = validate_image(call.body, async_route=True)
    if isinstance(params, web.Response):
        return params
    _note_request(call, params)
    early = await apply_front_mode(state, call, deferred=ASYNC_TASK_FAIL_MODES)
    if early is not None:
        return early
    task = AsyncTask(
        task_id=uuid.uuid4().hex,
        model=params.model,
        request_id=call.request_id,
        ready_at=time.monotonic() + state.latency(call.directives.latency),
        params=params,
        mode=call.mode,
        record=call.record,
    )
    state.add_task(task)
    return json_response(
        {
            "model": task.model,
            "id": task.task_id,
            "request_id": task.request_id,
            "task_status": "PROCESSING",
        }
    )


async def handle_async_submit(request: web.Request) -> web.StreamResponse:
    """``POST /async/images/generations`` (glm-image only): accept and return a task id."""
    return await provider_call(request, "async.images.generations", "prompt", _async_submit_impl)


async def handle_async_result(request: web.Request) -> web.StreamResponse:
    """``GET /async-result/{id}``: PROCESSING until ready and polled enough, then the result.

    Body-shaped failure modes (truncated, huge, redirect...) apply to the final answer,
    because that is the response a worker parses for the image. While the gate is closed a
    poll waits (after authentication) and does not count as one.
    """
    state = request.app[STATE_KEY]
    state.calls["async-result"] += 1
    denied = auth_error(request, state)
    if denied is not None:
        return denied
    await state.gate.passage()  # a closed gate holds the task's progress too
    task = state.tasks.get(request.match_info["task_id"])
    if task is None:
        return zhipu_error(404, "404", "Task not found")
    task.polls += 1
    if task.polls <= state.config.async_poll_steps or time.monotonic() < task.ready_at:
        processing = {"model": task.model, "request_id": task.request_id, "task_status": "PROCESSING"}
        return json_response(processing)
    return await _task_outcome(request, state, task)


async def _task_outcome(request: web.Request, state: EmulatorState, task: AsyncTask) -> web.StreamResponse:
    """The answer to a poll of a ready task: ``FAIL`` for a deferred error mode, else the image
    (made once, the same items on every later poll), with body-shaped modes applied."""
    base = {"model": task.model, "request_id": task.request_id}
    mode = task.mode
    if mode is not None and mode.name in ASYNC_TASK_FAIL_MODES:
        if not task.finished:
            task.finished = True
            state.tasks_failed += 1
        row = ERROR_MODES[mode.name]
        return json_response({**base, "task_status": "FAIL", **error_body(row.code, row.message)})
    generic = generic_body_mode(mode)
    if generic is not None:
        return generic

    def build(items: list[dict[str, str]]) -> dict[str, Any]:
        return {**base, "task_status": "SUCCESS", "image_result": items}

    response, items = await _image_answer(
        request, state, mode=mode, items=task.items, params=task.params, build=build
    )
    if items is not None:
        task.items = items
    if not task.finished:
        task.finished = True
        state.tasks_succeeded += 1
        if task.record is not None and delivers_normally(mode):
            task.record.images = 1
    return response
