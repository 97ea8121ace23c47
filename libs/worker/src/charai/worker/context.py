"""What a handler sees of the runtime: the task, a progress reporter, the media store, the provider."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Protocol

from charai.core.domain.states import PROGRESS_CALL_END, PROGRESS_CALL_START, Stage
from charai.core.domain.usage import Metered
from charai.core.media import MEDIA_URL_PREFIX
from charai.tasks.v1 import task_pb2
from charai.worker.http import ProviderHttp

__all__ = [
    "MEDIA_URL_PREFIX",
    "Handler",
    "JobAbortedError",
    "JobContext",
    "MediaRef",
    "Result",
    "advancing_progress",
]


class JobAbortedError(Exception):
    """The task ended (e.g. it was cancelled) or this attempt no longer holds it: stop now."""


@dataclasses.dataclass(frozen=True, slots=True)
class MediaRef:
    """A stored media object. ``url`` is charai's internal reference; the gateway turns it into a
    signed capability URL for clients."""

    key: str
    size: int
    content_type: str

    @property
    def url(self) -> str:
        return MEDIA_URL_PREFIX + self.key


class JobContext(Protocol):
    """One running attempt of one task."""

    @property
    def task(self) -> task_pb2.Task: ...

    @property
    def attempt(self) -> int: ...

    @property
    def provider(self) -> ProviderHttp: ...

    async def progress(self, percent: int, stage: str = Stage.GENERATING) -> None:
        """Reports progress (10-90); raises JobAbortedError if the task ended meanwhile."""

    async def store_media(self, data: bytes, extension: str, content_type: str) -> MediaRef:
        """Stores media under a key made from the task id, so a retry overwrites, never duplicates."""

    def meter(self, usage: Metered) -> None:
        """Records what a call the provider charges for used (``charai.core.domain.usage``).

        Call it as soon as the provider has answered with what it charges for, before anything
        else can fail: it is reported with the attempt's outcome, whether the attempt then
        completes or fails (e.g. the media store is away), and recorded once per attempt.
        """


Result = task_pb2.ImageResult | task_pb2.TtsResult


class Handler(Protocol):
    """Runs one kind of job against a provider."""

    kind: str

    async def run(self, ctx: JobContext) -> Result:
        """Returns the result, or raises ProviderError / JobAbortedError."""


@contextlib.asynccontextmanager
async def advancing_progress(
    ctx: JobContext,
    expected_seconds: float,
    start: int = PROGRESS_CALL_START,
    end: int = PROGRESS_CALL_END,
    interval: float = 1.0,
) -> AsyncIterator[None]:
    """Advances progress from ``start`` towards ``end`` while a provider call is in flight.

    The curve approaches ``end`` asymptotically (63 % of the way at ``expected_seconds``), so a
    slow call never shows 80 % long before it is done, and a fast one still shows movement.
    """
    await ctx.progress(start, Stage.GENERATING)

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        last = start
        while True:
            await asyncio.sleep(interval)
            elapsed = loop.time() - began
            value = start + int((end - start) * (1 - math.exp(-elapsed / max(expected_seconds, 0.1))))
            if value > last:
                last = value
                await ctx.progress(value, Stage.GENERATING)

    ticker = asyncio.create_task(tick())
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        if not ticker.cancelled() and ticker.exception() is not None:
            raise ticker.exception()  # type: ignore[misc]
