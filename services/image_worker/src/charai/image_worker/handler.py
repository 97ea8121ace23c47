"""The image job: ask the provider for a picture, check it is one, copy it into charai's store."""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import quote

import structlog
from charai.core.domain import errors, provider_models, usage
from charai.core.domain.errors import ErrorKind
from charai.core.domain.states import PROGRESS_CALL_END, PROGRESS_CALL_START, PROGRESS_PROCESSING, Stage
from charai.image_worker.media import ImageRejectedError, inspect_image
from charai.tasks.v1 import task_pb2
from charai.worker.answers import classify_error_body, decode_base64, json_object, raise_inband_error
from charai.worker.context import JobContext, advancing_progress
from charai.worker.provider import ProviderError

log = structlog.get_logger("image_worker")

ASYNC_MODELS = frozenset({"glm-image"})
"""Models with Zhipu's submit-and-poll endpoint."""

ASYNC_MODES = ("auto", "async", "sync")

MAX_POLL_FAILURES = 3
"""Consecutive transient failures of the status poll tolerated before the attempt fails.

Why: the job is already paid for and running at the provider; failing on one 5xx of a status
GET would make the retry submit (and pay for) a second picture."""

_TRANSIENT = frozenset({ErrorKind.PROVIDER_UNAVAILABLE, ErrorKind.PROVIDER_TIMEOUT, ErrorKind.RATE_LIMITED})


def default_size(model: str) -> str:
    """The provider's default size for ``model``; sent explicitly so the result is predictable."""
    return "1280x1280" if model == "glm-image" else "1024x1024"


def poll_progress(last: int, elapsed: float, expected_seconds: float) -> int:
    """Progress to show after a status poll: one step higher than ``last`` at least, following
    the same asymptotic curve as :func:`advancing_progress`, and never above the call's end.

    Why both: the curve alone does not move when polls are quick and the expected time is long,
    and a user should see every poll answer as movement.
    """
    span = PROGRESS_CALL_END - PROGRESS_CALL_START
    target = PROGRESS_CALL_START + int(span * (1 - math.exp(-elapsed / max(expected_seconds, 0.1))))
    return min(PROGRESS_CALL_END - 1, max(last + 1, target))


class ImageHandler:
    """Runs image jobs against Zhipu's or an OpenAI-compatible image API
    (``ProviderConfig.dialect``).

    Zhipu: glm-image through the async submit-and-poll endpoint (real progress), other models
    through ``POST /images/generations``; ``quality`` is sent when the task asks. OpenAI: only
    ``POST /images/generations`` (no async endpoint); DALL-E models get ``response_format``
    (``b64_json`` unless ``response_format`` says ``url``), GPT image models never (they refuse
    it and always answer ``b64_json``) and get ``output_format`` when the task asks. A URL answer
    is downloaded at once (OpenAI's expire after 60 minutes).

    Args:
        async_mode: ``auto`` (glm-image uses the async endpoint and falls back to the synchronous
            one if the provider has no async route), ``async`` (glm-image always async), or
            ``sync`` (always the synchronous endpoint).
        poll_interval: Seconds between status polls of an async job.
        expected_seconds: Typical generation time; shapes the progress curve only.
        response_format: Sent as ``response_format`` on the synchronous endpoint when set
            (``b64_json`` or ``url``). Zhipu does not document it, so by default it is not sent
            and the answer's ``url`` or ``b64_json`` is taken, whichever comes; the OpenAI
            dialect sends ``b64_json`` by default (no second download, nothing that expires) to
            the models that take the field.
    """

    kind = "image"

    def __init__(
        self,
        *,
        async_mode: str = "auto",
        poll_interval: float = 1.0,
        expected_seconds: float = 15.0,
        response_format: str | None = None,
    ):
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"async_mode must be one of {ASYNC_MODES}, not {async_mode!r}")
        if response_format not in (None, "url", "b64_json"):
            raise ValueError(f"response_format must be url or b64_json, not {response_format!r}")
        self._response_format = response_format
        self._async_mode = async_mode
        self._poll_interval = max(0.0, poll_interval)
        self._expected_seconds = expected_seconds

    async def run(self, ctx: JobContext) -> task_pb2.ImageResult:
        """Generates, validates and stores one image; raises ProviderError on any provider failure."""
        payload = ctx.task.image
        model = ctx.provider.config.model
        # Zhipu's docs write some sizes with "×"; the API wants an ASCII "x".
        size = (payload.resolution or default_size(model)).replace("×", "x")
        data: bytes | None = None
        zhipu = ctx.provider.config.dialect != provider_models.OPENAI
        if zhipu and model in ASYNC_MODELS and self._async_mode != "sync":
            data = await self._generate_async(ctx, model, size)
        if data is None:
            data = await self._generate_sync(ctx, model, size)
        try:
            # Decoding a few megapixels takes tens of milliseconds: keep the event loop (and the
            # other jobs' progress reports) running meanwhile.
            info = await asyncio.to_thread(inspect_image, data)
        except ImageRejectedError as exc:
            raise ProviderError(errors.bad_response(str(exc))) from None
        resolution = f"{info.width}x{info.height}"
        if resolution != size:
            log.info("image.size_differs", requested=size, received=resolution, task_id=ctx.task.id)
        await ctx.progress(PROGRESS_PROCESSING, Stage.PROCESSING)
        ref = await ctx.store_media(data, info.extension, info.content_type)
        result = task_pb2.ImageResult(
            image_url=ref.url,
            prompt=payload.prompt,
            resolution=resolution,
            content_type=info.content_type,
            width=info.width,
            height=info.height,
            size_bytes=len(data),
        )
        result.generated_at.GetCurrentTime()
        return result

    def _sync_body(self, ctx: JobContext, model: str, size: str) -> dict[str, Any]:
        """The ``images/generations`` request in the provider's dialect."""
        payload = ctx.task.image
        body: dict[str, Any] = {"model": model, "prompt": payload.prompt, "size": size, "n": 1}
        if payload.quality:
            body["quality"] = payload.quality
        if ctx.provider.config.dialect != provider_models.OPENAI:
            if self._response_format:
                body["response_format"] = self._response_format
            return body
        rules = provider_models.image_model(provider_models.OPENAI, model)
        if rules.response_format:
            body["response_format"] = self._response_format or "b64_json"
        if payload.output_format and rules.output_formats:
            body["output_format"] = payload.output_format
        return body

    async def _generate_sync(self, ctx: JobContext, model: str, size: str) -> bytes:
        body = self._sync_body(ctx, model, size)
        async with advancing_progress(ctx, self._expected_seconds):
            response = await ctx.provider.request("POST", "/images/generations", json_body=body)
            answer = json_object(response)
            raise_inband_error(answer, ctx.provider)
            data = answer.get("data")
            if not isinstance(data, list) or not data:
                raise ProviderError(errors.bad_response("the answer has no image (missing or empty data)"))
            _meter(ctx, model, size)
            return await _image_bytes(ctx, data[0])

    async def _generate_async(self, ctx: JobContext, model: str, size: str) -> bytes | None:
        """Submits and polls a glm-image job; ``None`` means "no async route, use sync" (auto only)."""
        await ctx.progress(PROGRESS_CALL_START, Stage.GENERATING)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            response = await ctx.provider.request(
                "POST",
                "/async/images/generations",
                json_body=_async_body(ctx.task.image, model, ctx.task.image.prompt, size),
            )
        except ProviderError as exc:
            if self._async_mode == "auto" and exc.failure.http_status in (404, 405):
                log.warning("image.async_route_missing", status=exc.failure.http_status)
                return None
            raise
        answer = json_object(response)
        key_setting = ctx.provider.config.key_setting
        raise_inband_error(answer, ctx.provider)
        job_id = answer.get("id")
        if not isinstance(job_id, str) or not job_id.strip():
            raise ProviderError(errors.bad_response("the async submit answer has no job id"))
        item = _async_outcome(answer, key_setting=key_setting, at_submit=True)
        path = "/async-result/" + quote(job_id, safe="")
        deadline = began + ctx.provider.config.timeout
        last = PROGRESS_CALL_START
        failures = 0
        while item is None:
            if loop.time() >= deadline:
                raise ProviderError(errors.timeout(ctx.provider.config.timeout))
            await asyncio.sleep(self._poll_interval)
            try:
                response = await ctx.provider.request("GET", path)
            except ProviderError as exc:
                if exc.failure.http_status == 404:
                    # The provider lost the job: a new attempt (a new submit) can still succeed.
                    raise ProviderError(
                        errors.bad_response("the provider no longer knows the async job")
                    ) from None
                failures += 1
                if exc.failure.kind not in _TRANSIENT or failures > MAX_POLL_FAILURES:
                    raise
                log.warning("image.poll_failed", kind=exc.failure.kind.name, failures=failures)
                continue
            failures = 0
            answer = json_object(response)
            if answer.get("task_status") != "FAIL":
                raise_inband_error(answer, ctx.provider)
            item = _async_outcome(answer, key_setting=key_setting, at_submit=False)
            value = poll_progress(last, loop.time() - began, self._expected_seconds)
            if value > last:
                last = value
                await ctx.progress(value, Stage.GENERATING)
        _meter(ctx, model, size)
        return await _image_bytes(ctx, item)


def _meter(ctx: JobContext, model: str, size: str) -> None:
    """The provider made (and charges for) the picture an answer names, whatever happens to it
    next: an image that is not one, an inline image whose base64 is broken or too large, a link
    whose download fails."""
    ctx.meter(usage.image_call(ctx.provider.config.dialect, model, size, ctx.task.image.quality))


def _async_body(payload: task_pb2.ImagePayload, model: str, prompt: str, size: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "size": size}
    if payload.quality:
        body["quality"] = payload.quality
    return body


def _async_outcome(answer: dict[str, Any], *, key_setting: str, at_submit: bool) -> Any:
    """The finished job's first ``image_result`` entry, ``None`` while it runs; raises on failure.

    At submit a missing status is read as "accepted"; in a poll answer it is a bad response.
    """
    status = answer.get("task_status")
    if status == "SUCCESS":
        results = answer.get("image_result")
        if not isinstance(results, list) or not results:
            raise ProviderError(errors.bad_response("the finished job has no image_result"))
        return results[0]
    if status == "FAIL":
        error = answer.get("error") or answer.get("error_info")
        if error:
            raise ProviderError(classify_error_body(error, key_setting=key_setting))
        message = answer.get("message") or answer.get("error_message") or "no reason given"
        raise ProviderError(errors.bad_response(f"the image job failed ({str(message)[:300]})"))
    if status == "PROCESSING" or (at_submit and status is None):
        return None
    raise ProviderError(errors.bad_response(f"unknown job status {str(status)[:50]!r}"))


async def _image_bytes(ctx: JobContext, item: Any) -> bytes:
    """The image an answer entry carries, inline (``b64_json``) or by URL (downloaded now, since
    provider URLs expire)."""
    if not isinstance(item, dict):
        raise ProviderError(errors.bad_response("the image entry is not an object"))
    inline = item.get("b64_json")
    if inline:
        return decode_base64(inline, cap=ctx.provider.config.max_body_bytes, what="b64_json")
    url = item.get("url")
    if isinstance(url, str) and url:
        return (await ctx.provider.download(url)).body
    raise ProviderError(errors.bad_response("the image entry has neither url nor b64_json"))
