"""Progress of the running attempts to task_store: coalesced, in the background, best effort.

A report also renews the attempt's lease; a refusal (FAILED_PRECONDITION: the task ended, or
the attempt is no longer the task's current one) aborts the attempt's handler.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog
from charai.core.storeclient import StoreClient
from charai.worker.attempt import Attempt
from charai.worker.storecalls import StoreCalls

log = structlog.get_logger("worker")


class ProgressReporter:
    """Sends each attempt's progress, at most one report per ``coalesce`` seconds per attempt."""

    def __init__(self, store: StoreClient, calls: StoreCalls, coalesce: float) -> None:
        self._store = store
        self._calls = calls
        self._coalesce = coalesce

    def soon(self, attempt: Attempt) -> None:
        """Makes sure the attempt's latest progress reaches task_store (see :meth:`_send`)."""
        if attempt.settling or attempt.abort_reason:
            return
        if attempt.reporter is None or attempt.reporter.done():
            attempt.reporter = asyncio.create_task(self._send(attempt))

    async def _send(self, attempt: Attempt) -> None:
        """Sends the attempt's progress until task_store has the latest, one report per
        ``coalesce`` seconds: whatever changed meanwhile goes out as one report."""
        loop = asyncio.get_running_loop()

        def pending() -> bool:
            if attempt.settling or attempt.abort_reason:
                return False
            return (attempt.progress, attempt.stage) != attempt.sent

        while pending():
            wait = attempt.sent_at + self._coalesce - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the job may have ended or moved on meanwhile
            current = (attempt.progress, attempt.stage)
            attempt.sending = True
            try:
                await self.report(attempt)
            except grpc.aio.AioRpcError as exc:
                # Unreachable (or refusing for another reason): the heartbeat renews the lease
                # and the next progress tries again.
                log.warning("progress_not_reported", code=exc.code().name, progress=attempt.progress)
                return
            finally:
                attempt.sending = False
                attempt.sent_at = loop.time()
            attempt.sent = current

    async def end(self, attempt: Attempt) -> None:
        """Stops progress reporting before the outcome is settled, so task_store never sees
        progress after the result: a report on the wire is let finish, one waiting out its
        window is dropped (a stage it would have recorded travels with the result instead, see
        :meth:`charai.worker.outcome.Outcomes.complete`)."""
        attempt.settling = True
        reporter = attempt.reporter
        if reporter is not None and not reporter.done():
            if not attempt.sending:
                reporter.cancel()
            await asyncio.wait([reporter])  # never raises what the reporter raised; our own cancel does
            if not reporter.cancelled() and reporter.exception() is not None:
                log.warning("progress_reporter_failed", error=str(reporter.exception()))

    async def report(self, attempt: Attempt, *, renewal: bool = False) -> None:
        """Sends progress (and so renews the lease); a refusal aborts the attempt.

        A progress report waits behind the claims and outcomes queued for a store call slot; a
        renewal (the heartbeat's) does not: under a store that cannot keep up with the claims,
        the reports could wait for as long as that lasts, and a lease must not."""
        task_id, number, progress, stage = attempt.task_id, attempt.attempt, attempt.progress, attempt.stage
        try:
            await self._calls.run(
                lambda: self._store.report_progress(task_id, number, progress, stage), report=not renewal
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                attempt.abort(exc.details() or "the task ended")
            else:
                raise

    async def renew(self, held: list[Attempt]) -> None:
        """Reports every held attempt at once, renewing their leases (the runner's heartbeat)."""

        async def one(attempt: Attempt) -> None:
            with contextlib.suppress(Exception):  # an unreachable task_store: try again next beat
                await self.report(attempt, renewal=True)

        await asyncio.gather(*(one(a) for a in held))
