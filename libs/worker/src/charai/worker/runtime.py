"""The job runner shared by every worker kind.

One process holds up to ``concurrency`` jobs in flight. Jobs come from three priority lanes
(durable pull consumers); whenever slots are free the runner probes the lanes in priority order
(with an occasional turn for the lower lanes, so low is never starved), and when every lane is
empty it long-polls all of them. Each delivered job is claimed from task_store (which fences
attempts), run by the handler, and acknowledged only after its result or failure is stored:
``ack`` when done, ``nak(delay)`` for a retry, ``term`` for a permanent failure.

What a fault costs (the fault tests in ``tests/faults`` hold the runner to this):

* task_store unreachable for a while: progress reports are skipped (best effort) and the
  outcome of a finished attempt is re-sent until it is recorded (``settle_seconds``), so work
  already paid for is not thrown away; the store deduplicates a repeat whose answer was lost.
* NATS unreachable: ``ack``/``nak`` may be lost; JetStream redelivers and the store's fencing
  turns the repeat into a no-op (``CLAIM_OUTCOME_DONE``) or a fresh attempt.
* SIGTERM: no new jobs; held jobs get the grace period, then are handed back through the store
  (``WORKER_LOST``, retried with backoff) so another worker need not wait for the lease to expire.
* SIGKILL: nothing runs; the lease expires and the next delivery starts a new attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog
from charai.core import logs, tracing
from charai.core.domain.errors import ErrorKind
from charai.core.domain.states import Stage
from charai.core.media import MediaStore, media_key
from charai.core.storeclient import StoreClient
from charai.core.topology import LANES, Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from charai.worker.context import Handler, JobAbortedError, MediaRef, Result
from charai.worker.http import ProviderError, ProviderHttp
from charai.worker.lanes import Lane
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

log = structlog.get_logger("worker")
T = TypeVar("T")

#: task_store answers that mean "not reachable right now", as opposed to a refusal. CANCELLED
#: is what calls still queued at a task_store get when it stops (SIGTERM) past its grace period.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

#: Probe order per scheduling round: mostly high first; every 4th round normal first, every 8th low.
_ORDERS = [(0, 1, 2)] * 5 + [(1, 0, 2), (1, 0, 2), (2, 0, 1)]


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerConfig:
    kind: str
    concurrency: int = 64
    ack_wait: float = 30.0
    max_deliver: int = 20
    heartbeat_interval: float = 10.0
    long_poll_seconds: float = 5.0
    max_batch: int = 64
    worker_id: str = "worker"
    replicas: int = 1
    #: How long a finished attempt keeps re-sending its outcome while task_store is unreachable.
    settle_seconds: float = 60.0
    #: Timeout of the hand-back call at shutdown (the process is about to exit).
    handback_timeout: float = 2.0
    #: Progress reports go out in the background, at most one per this many seconds per job: a
    #: report superseded within the window (20 % then 90 % of a call that answers at once) is
    #: never sent, and one still pending when the job ends gives way to the result.
    progress_coalesce: float = 0.05
    #: task_store calls (claims, reports, outcomes) in flight at once from this worker; the
    #: rest wait their turn here (see :meth:`JobRunner._store_call`).
    store_calls: int = 64


@dataclasses.dataclass(slots=True)
class _Running:
    msg: Msg
    task_id: str
    attempt: int
    job_task: asyncio.Task[Any] | None = None
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


class _Context:
    """JobContext of one attempt: progress goes to task_store, media to the bucket."""

    def __init__(self, runner: JobRunner, running: _Running, task: task_pb2.Task) -> None:
        self._runner = runner
        self._running = running
        self._task = task

    @property
    def task(self) -> task_pb2.Task:
        return self._task

    @property
    def attempt(self) -> int:
        return self._running.attempt

    @property
    def provider(self) -> ProviderHttp:
        return self._runner.provider

    async def progress(self, percent: int, stage: str = Stage.GENERATING) -> None:
        """Records progress and returns at once; the runner sends it in the background.

        A refusal (the task ended) aborts the job, an unreachable task_store does not. Why best
        effort: progress is for watchers, and the heartbeat renews the lease. Failing the attempt
        because task_store is restarting would cost a provider call and an attempt. Why in the
        background: the handler's provider call should not wait for a store round trip, and
        reports superseded within ``progress_coalesce`` cost the store nothing.
        """
        r = self._running
        if r.abort_reason:
            raise JobAbortedError(r.abort_reason)
        r.progress, r.stage = max(r.progress, percent), stage
        self._runner.report_soon(r)

    async def store_media(self, data: bytes, extension: str, content_type: str) -> MediaRef:
        key = media_key(self._task.id, extension)
        await self._runner.media.put(key, data)
        # The fault tests kill the worker on this line: the media is stored, the result not yet.
        log.debug("media_stored", key=key, size=len(data))
        return MediaRef(key, len(data), content_type)


class JobRunner:
    """Pulls, runs and settles jobs of one kind."""

    def __init__(
        self,
        config: RunnerConfig,
        handler: Handler,
        nc: Client,
        js: JetStreamContext,
        store: StoreClient,
        media: MediaStore,
        provider: ProviderHttp,
        topology: Topology,
    ) -> None:
        self.config = config
        self.handler = handler
        self.provider = provider
        self.media = media
        self._nc = nc
        self._js = js
        self._store = store
        self._topology = topology
        self._lanes: list[Lane] = []
        self._running: dict[str, _Running] = {}
        self._ready: list[tuple[int, int, Lane, Msg]] = []
        self._counter = itertools.count()
        self._rounds = itertools.count()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._job_tasks: set[asyncio.Task[Any]] = set()
        self._cancel_sub: Any = None
        self._closed = False
        self.completed = 0
        self._store_slots = asyncio.Semaphore(config.store_calls)
        #: task_store calls in flight now, and the most at once (metrics and tests).
        self.store_calls = 0
        self.store_calls_peak = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        stream = self._topology.jobs_stream
        for rank, lane_name in enumerate(LANES):
            consumer = self._topology.consumer(self.config.kind, lane_name)
            await self._ensure_consumer(
                stream, consumer, self._topology.lane_subject(self.config.kind, lane_name)
            )
            lane = Lane(self._nc, stream, consumer, lane_name, rank, self._on_message, self._wake.set)
            await lane.start()
            self._lanes.append(lane)
        self._cancel_sub = await self._nc.subscribe(self._topology.cancel_wildcard, cb=self._on_cancel)
        self._tasks = [
            asyncio.create_task(self._schedule(), name=f"{self.config.kind}-scheduler"),
            asyncio.create_task(self._heartbeat(), name=f"{self.config.kind}-heartbeat"),
        ]
        logs.announce("worker_started", kind=self.config.kind, concurrency=self.config.concurrency)

    async def _ensure_consumer(self, stream: str, durable: str, subject: str) -> None:
        config = js_api.ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait,
            max_deliver=self.config.max_deliver,
            max_ack_pending=100_000,
            max_waiting=4096,
            num_replicas=self.config.replicas,
        )
        try:
            await self._js.add_consumer(stream, config)
        except BadRequestError as exc:
            # Another worker created it with other settings; use it as it is.
            log.warning("consumer_config_differs", consumer=durable, error=str(exc))

    async def close(self, grace: float = 10.0) -> None:
        """Stops taking jobs, lets in-flight ones finish within ``grace``, hands back the rest."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        for task in self._tasks[:1]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lane in self._lanes:
            await lane.close()
        # Jobs fetched but not started go straight back.
        for _, _, _, msg in self._ready:
            with contextlib.suppress(Exception):
                await msg.nak()
        self._ready.clear()
        if self._job_tasks:
            _, pending = await asyncio.wait(self._job_tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
        logs.announce("worker_stopped", kind=self.config.kind, completed=self.completed)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # -- scheduling --------------------------------------------------------------------------
    def _on_message(self, lane: Lane, msg: Msg) -> None:
        if self._stopping:
            task = asyncio.create_task(msg.nak())
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)
            return
        if len(self._job_tasks) < self.config.concurrency:
            self._spawn(lane, msg)
        else:
            heapq.heappush(self._ready, (lane.rank, next(self._counter), lane, msg))
        self._wake.set()

    def _spawn(self, lane: Lane, msg: Msg) -> None:
        task = asyncio.create_task(self._run_job(lane, msg))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._job_tasks.discard(task)
        if not self._stopping:
            while self._ready and len(self._job_tasks) < self.config.concurrency:
                _, _, lane, msg = heapq.heappop(self._ready)
                self._spawn(lane, msg)
        self._wake.set()

    def _free(self) -> int:
        return self.config.concurrency - len(self._job_tasks) - len(self._ready)

    async def _schedule(self) -> None:
        while not self._stopping:
            try:
                free = self._free()
                got = 0
                if free > 0:
                    order: Sequence[int] = _ORDERS[next(self._rounds) % len(_ORDERS)]
                    for rank in order:
                        got = await self._lanes[rank].probe(min(free, self.config.max_batch))
                        if got:
                            break
                    if not got:
                        for lane in self._lanes:
                            await lane.long_poll(self.config.long_poll_seconds)
                if got and self._free() > 0:
                    continue  # there may be more: probe again at once
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("schedule_failed", error=str(exc))
                await asyncio.sleep(0.5)

    async def _heartbeat(self) -> None:
        """Keeps held jobs alive: ``in_progress`` to JetStream for every held message, then the
        lease renewals to task_store in the background, all at once.

        Why apart: while task_store is unreachable a renewal waits (the store client waits for
        its channel) up to its timeout. Awaited one after the other in this loop, the renewals
        delayed every later ``in_progress`` past the ack wait, so JetStream redelivered jobs that
        were still running, and once the lease ran out a second attempt called the provider again
        beside the first (found by tests/faults/test_task_store_restart.py).
        """
        renewals: asyncio.Task[Any] | None = None
        try:
            while True:
                await asyncio.sleep(self.config.heartbeat_interval)
                held = [msg for _, _, _, msg in self._ready] + [r.msg for r in self._running.values()]
                for msg in held:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                if self._running and (renewals is None or renewals.done()):
                    renewals = asyncio.create_task(self._renew(list(self._running.values())))
        finally:
            if renewals is not None:
                renewals.cancel()

    async def _renew(self, held: list[_Running]) -> None:
        async def one(running: _Running) -> None:
            with contextlib.suppress(Exception):  # an unreachable task_store: try again next beat
                await self.report(running)

        await asyncio.gather(*(one(r) for r in held))

    # -- one job -----------------------------------------------------------------------------
    def report_soon(self, running: _Running) -> None:
        """Makes sure the job's latest progress reaches task_store (see :meth:`_send_progress`)."""
        if running.settling or running.abort_reason:
            return
        if running.reporter is None or running.reporter.done():
            running.reporter = asyncio.create_task(self._send_progress(running))

    async def _send_progress(self, running: _Running) -> None:
        """Sends the job's progress until task_store has the latest, one report per
        ``progress_coalesce`` seconds: whatever changed meanwhile goes out as one report."""
        loop = asyncio.get_running_loop()

        def pending() -> bool:
            if running.settling or running.abort_reason:
                return False
            return (running.progress, running.stage) != running.sent

        while pending():
            wait = running.sent_at + self.config.progress_coalesce - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the job may have ended or moved on meanwhile
            current = (running.progress, running.stage)
            running.sending = True
            try:
                await self.report(running)
            except grpc.aio.AioRpcError as exc:
                # Unreachable (or refusing for another reason): the heartbeat renews the lease
                # and the next progress tries again.
                log.warning("progress_not_reported", code=exc.code().name, progress=running.progress)
                return
            finally:
                running.sending = False
                running.sent_at = loop.time()
            running.sent = current

    async def _end_reports(self, running: _Running) -> None:
        """Stops progress reporting before the outcome is settled, so task_store never sees
        progress after the result: a report on the wire is let finish, one waiting out its
        window is dropped (a stage it would have recorded travels with the result instead, see
        :meth:`_execute`)."""
        running.settling = True
        reporter = running.reporter
        if reporter is not None and not reporter.done():
            if not running.sending:
                reporter.cancel()
            await asyncio.wait([reporter])  # never raises what the reporter raised; our own cancel does
            if not reporter.cancelled() and reporter.exception() is not None:
                log.warning("progress_reporter_failed", error=str(reporter.exception()))

    async def report(self, running: _Running) -> None:
        """Sends progress (and so renews the lease); a refusal aborts the job."""
        request = spb.ReportProgressRequest(
            task_id=running.task_id, attempt=running.attempt, progress=running.progress, stage=running.stage
        )
        try:
            await self._store_call(lambda: self._store.stub.ReportProgress(request, **self._store.kw()))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._abort(running, exc.details() or "the task ended")
            else:
                raise

    def _abort(self, running: _Running, reason: str) -> None:
        if not running.abort_reason:
            running.abort_reason = reason
            if running.inner is not None:
                running.inner.cancel()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            notice = spb.CancelNotice.FromString(msg.data)
        except Exception:
            return
        running = self._running.get(notice.task_id)
        if running is not None:
            log.info("job_cancel_requested", task_id=notice.task_id)
            self._abort(running, "the task was cancelled")

    # -- settling ----------------------------------------------------------------------------
    async def _store_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One task_store call, with at most ``store_calls`` of them in flight from this worker.

        Why: with 1,000 jobs in flight their claims, reports and outcomes come in bursts (a batch
        of jobs starts together, their calls return together); queued here each costs a waiting
        coroutine, queued in the gRPC core each costs a call's native buffers, most of a worker's
        memory per job in ``make bench`` B3. task_store answers them a commit batch at a time,
        so the bound costs no throughput. The hand-back at shutdown bypasses it (it must not wait
        behind calls that are stuck on an unreachable task_store).
        """
        async with self._store_slots:
            self.store_calls += 1
            self.store_calls_peak = max(self.store_calls_peak, self.store_calls)
            try:
                return await call()
            finally:
                self.store_calls -= 1

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
        deadline = loop.time() + self.config.settle_seconds
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
    async def _msg_op(op: str, msg: Msg, delay: float | None = None) -> None:
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

    async def _after_fail(self, msg: Msg, response: spb.FailTaskResponse) -> str:
        """Settles the message as the store decided; IGNORED keeps the message if the task still
        needs it (e.g. a repeated FailTask whose first try scheduled the retry)."""
        if response.outcome == spb.FAIL_OUTCOME_RETRY:
            await self._msg_op("nak", msg, response.retry_delay_seconds)
            return "retry"
        if response.outcome == spb.FAIL_OUTCOME_FAILED:
            await self._msg_op("term", msg)
            return "failed"
        task = response.task
        if task.status == task_pb2.TASK_STATUS_QUEUED:
            wait = 0.0
            if task.HasField("next_attempt_time"):
                wait = task.next_attempt_time.ToMicroseconds() / 1e6 - time.time()
            await self._msg_op("nak", msg, max(0.05, wait))
            return "requeued"
        await self._msg_op("ack", msg)
        return "ignored"

    async def _hand_back(self, running: _Running) -> None:
        """Gives a job this worker will not finish (shutdown past the grace period) back.

        The store records the attempt as lost to its worker (WORKER_LOST: retried after the usual
        backoff, or the task fails when that budget is spent) and the message is nak'ed with the
        store's delay. Why not a bare ``nak``: the task would stay RUNNING under this worker's
        lease, and every other worker would defer it until the lease expired
        (``CHARAI_LEASE_SECONDS``). If task_store cannot be reached the bare ``nak`` is the fallback.
        """
        error = task_pb2.TaskError(
            code=int(ErrorKind.WORKER_LOST),  # type: ignore[arg-type]
            message=f"the worker shut down during attempt {running.attempt} and handed the job back",
            retryable=True,
        )
        request = spb.FailTaskRequest(task_id=running.task_id, attempt=running.attempt, error=error)
        try:
            response = await self._store.stub.FailTask(
                request, **self._store.kw(timeout=self.config.handback_timeout)
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("handback_not_recorded", code=exc.code().name)
            await self._msg_op("nak", running.msg)
            return
        outcome = await self._after_fail(running.msg, response)
        log.info("job_handed_back", outcome=outcome)

    async def _run_job(self, lane: Lane, msg: Msg) -> None:
        started = time.perf_counter()
        outcome = "unknown"
        structlog.contextvars.bind_contextvars(lane=lane.name)
        try:
            job = spb.Job.FromString(msg.data)
        except Exception:
            await self._msg_op("term", msg)
            log.warning("job_unparseable")
            return
        # Join the trace of the call that created the task (Job field, or the message header).
        headers = msg.headers or {}
        traceparent = tracing.enter(job.traceparent or headers.get("traceparent", ""))
        structlog.contextvars.bind_contextvars(task_id=job.task_id, trace_id=tracing.trace_id(traceparent))
        try:
            request = spb.ClaimTaskRequest(
                task_id=job.task_id, dispatch_gen=job.dispatch_gen, worker_id=self.config.worker_id
            )
            claim = await self._store_call(lambda: self._store.stub.ClaimTask(request, **self._store.kw()))
        except grpc.aio.AioRpcError as exc:
            outcome = "claim_failed"
            log.warning("claim_failed", code=exc.code().name)
            await self._msg_op("nak", msg, 1.0)
            return
        if claim.outcome == spb.CLAIM_OUTCOME_DONE:
            await self._msg_op("ack", msg)
            log.info("job_skipped", reason="task already ended")
            return
        if claim.outcome == spb.CLAIM_OUTCOME_DEFER:
            await self._msg_op("nak", msg, max(0.05, claim.retry_after_seconds))
            return
        running = _Running(msg, job.task_id, claim.attempt)
        self._running[job.task_id] = running
        structlog.contextvars.bind_contextvars(attempt=claim.attempt)
        try:
            outcome = await self._execute(running, claim.task)
        finally:
            self._running.pop(job.task_id, None)
            log.info(
                "job_finished",
                outcome=outcome,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
                deliveries=_delivered(msg),
            )

    async def _execute(self, running: _Running, task: task_pb2.Task) -> str:
        ctx = _Context(self, running, task)
        msg = running.msg
        # The claim already recorded 10 % "starting" (and the lease): no report needed here.
        running.sent_at = asyncio.get_running_loop().time()
        try:
            running.inner = asyncio.create_task(self._handle(ctx, running))
            result = await running.inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Shutting down past the grace period: hand the job back at once.
                await self._hand_back(running)
                raise
            await self._msg_op("ack", msg)
            return "aborted"
        except JobAbortedError:
            await self._msg_op("ack", msg)
            return "aborted"
        except ProviderError as exc:
            f = exc.failure
            error = task_pb2.TaskError(
                code=int(f.kind),  # type: ignore[arg-type]
                message=f.message,
                retryable=f.retryable,
                provider_status=f.http_status,
                provider_code=f.provider_code,
            )
            return await self._fail(running, error, f.retry_after)
        except Exception as exc:
            log.exception("handler_crashed")
            error = task_pb2.TaskError(
                code=int(ErrorKind.INTERNAL),  # type: ignore[arg-type]
                message=f"the worker failed unexpectedly ({type(exc).__name__})",
                retryable=True,
            )
            return await self._fail(running, error, None)
        request = spb.CompleteTaskRequest(task_id=running.task_id, attempt=running.attempt)
        if running.stage != running.sent[1]:
            # A stage task_store has not recorded yet (e.g. 90 % "processing" of a call that
            # answered at once): recorded with the result, one call and one commit for both.
            request.progress, request.stage = running.progress, running.stage
        if isinstance(result, task_pb2.ImageResult):
            request.image_result.CopyFrom(result)
        else:
            request.tts_result.CopyFrom(result)
        try:
            await self._settle(
                lambda: self._store_call(lambda: self._store.stub.CompleteTask(request, **self._store.kw()))
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("complete_failed", code=exc.code().name)
                await self._msg_op("nak", msg, 1.0)
                return "complete_failed"
            await self._msg_op("ack", msg)
            return "aborted"
        await self._msg_op("ack", msg)
        self.completed += 1
        return "completed"

    async def _handle(self, ctx: _Context, running: _Running) -> Result:
        """The handler's run, then no more progress reports (whatever the outcome)."""
        try:
            return await self.handler.run(ctx)
        finally:
            await self._end_reports(running)

    async def _fail(self, running: _Running, error: task_pb2.TaskError, retry_after: float | None) -> str:
        request = spb.FailTaskRequest(
            task_id=running.task_id,
            attempt=running.attempt,
            error=error,
            retry_after_seconds=retry_after or 0.0,
        )
        try:
            response = await self._settle(
                lambda: self._store_call(lambda: self._store.stub.FailTask(request, **self._store.kw()))
            )
        except grpc.aio.AioRpcError:
            await self._msg_op("nak", running.msg, 1.0)
            return "fail_report_failed"
        outcome = await self._after_fail(running.msg, response)
        return f"{outcome}:{task_pb2.ErrorCode.Name(error.code)}"


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 0
