"""How an attempt ends: its outcome recorded in task_store, then its JetStream message settled.

``ack`` when the outcome is recorded (or there is nothing left to do), ``nak(delay)`` for a retry
or when recording failed, ``term`` for a permanent failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import structlog
from charai.core.domain.errors import ErrorKind
from charai.core.domain.usage import Metered
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from charai.worker.attempt import Attempt
from charai.worker.context import Result
from charai.worker.http import ProviderError
from charai.worker.storecalls import StoreCalls
from nats.aio.msg import Msg

log = structlog.get_logger("worker")
T = TypeVar("T")

#: task_store answers that mean "not reachable right now", as opposed to a refusal. CANCELLED
#: is what calls still queued at a task_store get when it stops (SIGTERM) past its grace period.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def provider_failure(exc: ProviderError) -> task_pb2.TaskError:
    """The task error of a provider call that failed (classified by the HTTP layer)."""
    f = exc.failure
    return task_pb2.TaskError(
        code=int(f.kind),  # type: ignore[arg-type]
        message=f.message,
        retryable=f.retryable,
        provider_status=f.http_status,
        provider_code=f.provider_code,
    )


def crash_failure(exc: Exception) -> task_pb2.TaskError:
    """The task error of a handler that raised something unexpected (retryable)."""
    return task_pb2.TaskError(
        code=int(ErrorKind.INTERNAL),  # type: ignore[arg-type]
        message=f"the worker failed unexpectedly ({type(exc).__name__})",
        retryable=True,
    )


def usage_report(usage: Metered | None) -> task_pb2.Usage | None:
    """An attempt's metered calls as CompleteTask / FailTask carry them (None: nothing charged)."""
    if usage is None:
        return None
    return task_pb2.Usage(
        provider=usage.provider,
        model=usage.model,
        calls=usage.calls,
        images=usage.images,
        image_size=usage.image_size,
        image_quality=usage.image_quality,
        speech_characters=usage.speech_characters,
        audio_seconds=usage.audio_seconds,
        reused=usage.reused,
    )


async def settle_message(op: str, msg: Msg, delay: float | None = None) -> None:
    """ack / nak / term that never raises: if NATS is unreachable the settle is lost,
    JetStream redelivers after the ack wait, and the store fences the repeat."""
    try:
        if op == "ack":
            await msg.ack()
        elif op == "term":
            await msg.term()
        else:
            await msg.nak(delay=delay)
    except Exception as exc:
        log.warning("settle_message_failed", op=op, error=str(exc) or type(exc).__name__)


async def settle_attempt(op: str, attempt: Attempt, delay: float | None = None) -> None:
    """Settles the attempt's message as decided; a pushed attempt whose message has not come yet
    keeps the decision for it (:meth:`charai.worker.jobs.Jobs.run` applies it on arrival)."""
    if attempt.msg is None:
        attempt.unsettled = (op, delay, time.monotonic())
        return
    await settle_message(op, attempt.msg, delay)


class Outcomes:
    """Records attempts' outcomes in task_store and settles their messages as it decided."""

    def __init__(
        self, store: StoreClient, calls: StoreCalls, settle_seconds: float, handback_timeout: float
    ) -> None:
        self._store = store
        self._calls = calls
        self._settle_seconds = settle_seconds
        self._handback_timeout = handback_timeout

    async def complete(self, attempt: Attempt, result: Result) -> str:
        """Records the result; ``completed``, or why not."""
        progress, stage = 0, ""
        if attempt.stage != attempt.sent[1]:
            # A stage task_store has not recorded yet (e.g. 90 % "processing" of a call that
            # answered at once): recorded with the result, one call and one commit for both.
            progress, stage = attempt.progress, attempt.stage
        task_id, number, usage = attempt.task_id, attempt.attempt, usage_report(attempt.usage)
        try:
            await self._settle(
                lambda: self._calls.run(
                    lambda: self._store.complete_task(
                        task_id, number, result, progress=progress, stage=stage, usage=usage
                    )
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("complete_failed", code=exc.code().name)
                await settle_attempt("nak", attempt, 1.0)
                return "complete_failed"
            await settle_attempt("ack", attempt)
            return "aborted"
        await settle_attempt("ack", attempt)
        return "completed"

    async def fail(self, attempt: Attempt, error: task_pb2.TaskError, retry_after: float | None) -> str:
        """Records the failure; the outcome (``retry``, ``failed`` …) and the error code."""
        task_id, number, delay = attempt.task_id, attempt.attempt, retry_after or 0.0
        usage = usage_report(attempt.usage)
        try:
            response = await self._settle(
                lambda: self._calls.run(
                    lambda: self._store.fail_task(
                        task_id, number, error, retry_after_seconds=delay, usage=usage
                    )
                )
            )
        except grpc.aio.AioRpcError:
            await settle_attempt("nak", attempt, 1.0)
            return "fail_report_failed"
        outcome = await self._after_fail(attempt, response)
        return f"{outcome}:{task_pb2.ErrorCode.Name(error.code)}"

    async def hand_back(self, attempt: Attempt) -> None:
        """Gives a job this worker will not finish (shutdown past the grace period) back.

        The store records the attempt as lost to its worker (WORKER_LOST: retried after the usual
        backoff, or the task fails when that budget is spent) and the message is nak'ed with the
        store's delay. Why not a bare ``nak``: the task would stay RUNNING under this worker's
        lease, and every other worker would defer it until the lease expired
        (``CHARAI_LEASE_SECONDS``). If task_store cannot be reached the bare ``nak`` is the fallback.
        """
        error = task_pb2.TaskError(
            code=int(ErrorKind.WORKER_LOST),  # type: ignore[arg-type]
            message=f"the worker shut down during attempt {attempt.attempt} and handed the job back",
            retryable=True,
        )
        try:
            response = await self._store.fail_task(
                attempt.task_id,
                attempt.attempt,
                error,
                usage=usage_report(attempt.usage),
                timeout=self._handback_timeout,
                batched=False,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("handback_not_recorded", code=exc.code().name)
            await settle_attempt("nak", attempt)
            return
        outcome = await self._after_fail(attempt, response)
        log.info("job_handed_back", outcome=outcome)

    async def report_usage(self, attempt: Attempt) -> None:
        """Reports what an aborted attempt (task cancelled, or the attempt lost its hold) paid
        for before it stopped: a FailTask the store answers IGNORED, recording only the usage.
        Best effort: nothing to report, or task_store unreachable, leaves it at that."""
        usage = usage_report(attempt.usage)
        if usage is None:
            return
        error = task_pb2.TaskError(
            code=int(ErrorKind.INTERNAL),  # type: ignore[arg-type]
            message=f"attempt {attempt.attempt} was aborted ({attempt.abort_reason or 'cancelled'})",
        )
        try:
            await self._calls.run(
                lambda: self._store.fail_task(attempt.task_id, attempt.attempt, error, usage=usage)
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("usage_not_reported", code=exc.code().name)

    async def _settle(self, call: Callable[[], Awaitable[T]]) -> T:
        """Runs a task_store call that records an attempt's outcome, retrying while task_store is
        unreachable, for up to ``settle_seconds``.

        Why: the attempt's work is done (and the provider paid); handing the job back because
        task_store is restarting would make the next attempt call the provider again. Meanwhile
        the heartbeat keeps the JetStream message (and, once task_store is back, the lease) alive.
        A repeat of a call whose answer was lost is harmless: CompleteTask of the same attempt
        returns the completed task, and FailTask answers IGNORED (handled by ``_after_fail``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settle_seconds
        delay = 0.1
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRANSIENT or loop.time() + delay > deadline:
                    raise
                log.warning("settle_retry", code=exc.code().name, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    @staticmethod
    async def _after_fail(attempt: Attempt, response: spb.FailTaskResponse) -> str:
        """Settles the message as the store decided; IGNORED keeps the message if the task still
        needs it (e.g. a repeated FailTask whose first try scheduled the retry)."""
        if response.outcome == spb.FAIL_OUTCOME_RETRY:
            await settle_attempt("nak", attempt, response.retry_delay_seconds)
            return "retry"
        if response.outcome == spb.FAIL_OUTCOME_FAILED:
            await settle_attempt("term", attempt)
            return "failed"
        task = response.task
        if task.status == task_pb2.TASK_STATUS_QUEUED:
            wait = 0.0
            if task.HasField("next_attempt_time"):
                wait = task.next_attempt_time.ToMicroseconds() / 1e6 - time.time()
            await settle_attempt("nak", attempt, max(0.05, wait))
            return "requeued"
        await settle_attempt("ack", attempt)
        return "ignored"
