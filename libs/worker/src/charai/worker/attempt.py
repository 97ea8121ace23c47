"""One attempt of one task inside the runner: its state, and the JobContext its handler gets."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

import structlog
from charai.core.domain.errors import storage_unavailable
from charai.core.domain.states import Stage
from charai.core.domain.usage import Metered
from charai.core.media import MediaStore, media_key
from charai.tasks.v1 import task_pb2
from charai.worker.context import JobAbortedError, MediaRef, Result
from charai.worker.http import ProviderHttp
from charai.worker.provider import ProviderError
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

if TYPE_CHECKING:
    from charai.worker.progress import ProgressReporter

log = structlog.get_logger("worker")

#: How long an attempt keeps trying to store its result while the media store is away (a
#: JetStream leader re-election, a NATS restart) before it fails as PROVIDER_UNAVAILABLE. The
#: result is in hand: failing at once would pay the provider again on the next attempt. The
#: heartbeat keeps the attempt's lease meanwhile.
MEDIA_PUT_PATIENCE = 30.0
#: The first and the longest pause between two tries of a put.
MEDIA_PUT_BACKOFF = (0.25, 4.0)


@dataclasses.dataclass(slots=True)
class Attempt:
    """A claimed job being run: the message that delivered it (None: pushed by task_store), and
    where its progress stands."""

    msg: Msg | None
    task_id: str
    attempt: int
    #: The dispatch generation of the job (what its JetStream message carries).
    gen: int = 0
    #: A pushed attempt that ended before its message came: how to settle that message (op,
    #: nak delay, and when it was decided, monotonic), for when it arrives.
    unsettled: tuple[str, float | None, float] | None = None
    inner: asyncio.Task[Result] | None = None
    progress: int = 10
    stage: str = Stage.STARTING
    abort_reason: str = ""
    #: What task_store last recorded for this attempt (the claim wrote 10 % "starting") and
    #: when (event-loop time), for the coalescing reporter.
    sent: tuple[int, str] = (10, Stage.STARTING)
    sent_at: float = 0.0
    #: The background task sending progress, while there is progress to send.
    reporter: asyncio.Task[None] | None = None
    #: A report RPC is on the wire (the reporter must not be cancelled mid-call).
    sending: bool = False
    #: The outcome is being settled: no further progress reports.
    settling: bool = False
    #: What this attempt's charged provider calls used so far (reported with its outcome).
    usage: Metered | None = None

    def abort(self, reason: str) -> None:
        """Stops the handler: the task ended (cancelled) or this attempt no longer holds it."""
        if not self.abort_reason:
            self.abort_reason = reason
            if self.inner is not None:
                self.inner.cancel()


class AttemptContext:
    """JobContext of one attempt: progress goes to task_store, media to the bucket."""

    def __init__(
        self,
        attempt: Attempt,
        task: task_pb2.Task,
        reporter: ProgressReporter,
        provider: ProviderHttp,
        media: MediaStore,
        media_patience: float = MEDIA_PUT_PATIENCE,
    ) -> None:
        self._attempt = attempt
        self._task = task
        self._reporter = reporter
        self._provider = provider
        self._media = media
        self._media_patience = media_patience

    @property
    def task(self) -> task_pb2.Task:
        return self._task

    @property
    def attempt(self) -> int:
        return self._attempt.attempt

    @property
    def provider(self) -> ProviderHttp:
        return self._provider

    async def progress(self, percent: int, stage: str = Stage.GENERATING) -> None:
        """Records progress and returns at once; the runner sends it in the background.

        A refusal (the task ended) aborts the job, an unreachable task_store does not. Why best
        effort: progress is for watchers, and the heartbeat renews the lease. Failing the attempt
        because task_store is restarting would cost a provider call and an attempt. Why in the
        background: the handler's provider call should not wait for a store round trip, and
        reports superseded within ``progress_coalesce`` cost the store nothing.
        """
        a = self._attempt
        if a.abort_reason:
            raise JobAbortedError(a.abort_reason)
        a.progress, a.stage = max(a.progress, percent), stage
        self._reporter.soon(a)

    def meter(self, usage: Metered) -> None:
        a = self._attempt
        a.usage = usage if a.usage is None else a.usage + usage

    async def store_media(self, data: bytes, extension: str, content_type: str) -> MediaRef:
        key = media_key(self._task.id, extension)
        # The key is the task's: the task's first attempt is the first to write it (an attempt
        # runs once; a re-run by an operator counts on from its last attempt).
        new = self._attempt.attempt == 1
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._media_patience
        pause, longest = MEDIA_PUT_BACKOFF
        tries = 0
        while True:
            tries += 1
            try:
                await self._media.put(key, data, new=new)
                break
            except (TimeoutError, NatsError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if loop.time() + pause >= give_up:
                    # Away for longer than the patience: a transient failure of this attempt,
                    # retried like an unreachable provider, not a handler crash.
                    raise ProviderError(storage_unavailable(reason)) from exc
                log.warning("media_put_retry", key=key, tries=tries, error=reason, pause_s=pause)
                # A put that failed may have stored some chunks, or all of it with its
                # acknowledgement lost: the next one replaces whatever is there.
                new = False
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
        # The fault tests kill the worker on this line: the media is stored, the result not yet.
        log.debug("media_stored", key=key, size=len(data))
        return MediaRef(key, len(data), content_type)
