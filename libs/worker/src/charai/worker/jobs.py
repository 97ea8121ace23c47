"""One delivered job, start to end: claimed from task_store, run by the handler, settled."""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog
from charai.core import tracing
from charai.core.media import MediaStore
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from charai.worker.attempt import Attempt, AttemptContext
from charai.worker.context import Handler, JobAbortedError, Result
from charai.worker.gate import FIRST_TURN
from charai.worker.http import ProviderError, ProviderHttp
from charai.worker.lanes import Lane
from charai.worker.outcome import Outcomes, crash_failure, provider_failure, settle_attempt, settle_message
from charai.worker.progress import ProgressReporter
from charai.worker.storecalls import StoreCalls
from nats.aio.msg import Msg

log = structlog.get_logger("worker")
#: How long a redelivered copy of a running job waits before JetStream offers it again.
_REDELIVERED_WAIT = 5.0
#: Claim failures after which the store may have taken the claim (its answer was lost).
_ANSWER_LOST = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_UNANSWERED_MAX = 10_000
#: How long a job that reached this worker before its push (``Job.pushed_to``) waits here for it
#: (a push normally follows within a millisecond; a lost push's lease has to expire anyway before
#: another attempt may start): then it goes back, to be claimed as usual when it comes again.
_PUSH_WAIT = 2.0


class Jobs:
    """Runs delivered jobs; ``running`` holds the attempts in progress, by task id."""

    def __init__(
        self,
        handler: Handler,
        store: StoreClient,
        provider: ProviderHttp,
        media: MediaStore,
        worker_id: str,
        calls: StoreCalls,
        reporter: ProgressReporter,
        outcomes: Outcomes,
    ) -> None:
        self._handler = handler
        self._store = store
        self._provider = provider
        self._media = media
        self._worker_id = worker_id
        self._calls = calls
        self._reporter = reporter
        self._outcomes = outcomes
        self.running: dict[str, Attempt] = {}
        #: Jobs whose message carries another task's attempt (ClaimTaskRequest.any_task), by
        #: the message's (task id, dispatch generation): a redelivery of one is settled like a
        #: running job's. The job itself, put back and released again meanwhile, comes under a
        #: new generation: that message is claimed as usual.
        self._carriers: set[tuple[str, int]] = set()
        #: Jobs (task id, dispatch generation) whose claim got no answer: the next delivery
        #: claims ``again``, so a claim the store did take is answered, not left to expire.
        #: Bounded: forgetting one only costs the wait for its lease, as before.
        self._unanswered: dict[tuple[str, int], None] = {}
        #: Pushed attempts that ended before their message came, by (task id, dispatch
        #: generation): how to settle it when it does. Bounded: a message forgotten (or gone to
        #: another worker) is claimed as usual, and answered DONE or DEFER.
        self._unsettled: dict[tuple[str, int], tuple[str, float | None, float]] = {}
        #: Messages of jobs pushed to this worker that came before their push, by (task id,
        #: dispatch generation): resolved when the pushed attempt starts (``_await_push``).
        self._awaiting: dict[tuple[str, int], asyncio.Future[None]] = {}
        #: Jobs completed by this process.
        self.completed = 0

    async def on_cancel(self, msg: Msg) -> None:
        """A task was cancelled (``CancelNotice``): abort its attempt if this worker runs it."""
        try:
            notice = spb.CancelNotice.FromString(msg.data)
        except Exception:
            return
        running = self.running.get(notice.task_id)
        if running is not None:
            log.info("job_cancel_requested", task_id=notice.task_id)
            running.abort("the task was cancelled")

    async def run(self, lane: Lane, msg: Msg) -> None:
        """Claims the delivered job from task_store (which fences attempts), then runs it."""
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(lane=lane.name)
        try:
            job = spb.Job.FromString(msg.data)
        except Exception:
            await settle_message("term", msg)
            log.warning("job_unparseable")
            return
        # Join the trace of the call that created the task (Job field, or the message header).
        headers = msg.headers or {}
        traceparent = tracing.enter(job.traceparent or headers.get("traceparent", ""))
        structlog.contextvars.bind_contextvars(task_id=job.task_id, trace_id=tracing.trace_id(traceparent))
        if await self._take_over(job, msg):
            return
        if self._awaits_push(job, msg):
            # Pushed to this very worker, and the push is not here yet: not claimed (a claim the
            # store decided late, after an outage longer than the lease, would start a second
            # attempt beside the pushed one). The pushed attempt takes it over once it starts.
            log.info("job_awaits_its_push")
            await self._await_push(job, msg)
            return
        if job.task_id in self.running or (job.task_id, job.dispatch_gen) in self._carriers:
            # JetStream redelivered a job this process is still running (an ack-wait ran out):
            # the attempt in hand acks it when it ends. Claiming again would answer the same
            # attempt (the store re-answers its holder) and run it twice. (A carrier's own task
            # released again has a new generation: matched by task id alone, its message waited
            # here 5 s while task_store counted it in the lane's buffer, and the lane stalled.)
            await settle_message("nak", msg, _REDELIVERED_WAIT)
            return
        worker_id, key = self._worker_id, (job.task_id, job.dispatch_gen)
        again = key in self._unanswered
        self._unanswered.pop(key, None)
        try:
            claim = await self._calls.run(
                lambda: self._store.claim_task(
                    job.task_id, job.dispatch_gen, worker_id, again=again, any_task=True
                )
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("claim_failed", code=exc.code().name)
            if exc.code() in _ANSWER_LOST:
                self._unanswered[key] = None
                while len(self._unanswered) > _UNANSWERED_MAX:
                    del self._unanswered[next(iter(self._unanswered))]
            await settle_message("nak", msg, 1.0)
            return
        if claim.outcome == spb.CLAIM_OUTCOME_DONE:
            await settle_message("ack", msg)
            log.info("job_skipped", reason="task already ended")
            return
        if claim.outcome == spb.CLAIM_OUTCOME_REUSED:
            # task_store completed the task with an identical request's result: no provider call.
            await settle_message("ack", msg)
            log.info("job_skipped", reason="result reused")
            return
        if claim.outcome == spb.CLAIM_OUTCOME_DEFER:
            # This message overtook its job's push (WorkerOffer), which arrived meanwhile: the
            # pushed attempt takes it over instead of waiting out the lease in JetStream.
            if await self._take_over(job, msg):
                return
            await settle_message("nak", msg, max(0.05, claim.retry_after_seconds))
            return
        await self._attempt(msg, job, claim, started)

    def pushed_here(self, msg: Msg) -> bool:
        """Whether ``msg`` carries the job of an attempt pushed to this worker (running, ended
        with its settling decided, or not here yet): :meth:`run` settles it without a claim."""
        try:
            job = spb.Job.FromString(msg.data)
        except Exception:
            return False
        if (job.task_id, job.dispatch_gen) in self._unsettled or self._awaits_push(job, msg):
            return True
        running = self.running.get(job.task_id)
        return running is not None and running.msg is None and running.gen == job.dispatch_gen

    def _awaits_push(self, job: spb.Job, msg: Msg) -> bool:
        """Whether ``job`` was pushed to this worker and overtook its push: its first delivery,
        and no attempt of it here. (Delivered again, after a retry's delay, a crash or a push
        that never came, it is settled or claimed as usual.)"""
        key = (job.task_id, job.dispatch_gen)
        return (
            job.pushed_to == self._worker_id
            and job.task_id not in self.running
            and key not in self._unsettled
            and key not in self._awaiting
            and _delivered(msg) == 1
        )

    async def _await_push(self, job: spb.Job, msg: Msg) -> None:
        """Holds ``msg`` until the attempt pushed with it starts here (then it takes ``msg``
        over), for ``_PUSH_WAIT`` at most: then ``msg`` goes back, claimed on its next delivery."""
        key = (job.task_id, job.dispatch_gen)
        started = self._awaiting[key] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(_PUSH_WAIT):
                await started
        except TimeoutError:
            await settle_message("nak", msg)
            return
        finally:
            if self._awaiting.get(key) is started:
                del self._awaiting[key]
        if not await self._take_over(job, msg):  # unexpected: the attempt runs, or left its settling
            await settle_message("nak", msg)

    async def _take_over(self, job: spb.Job, msg: Msg) -> bool:
        """The message of a pushed attempt (``WorkerOffer``): the attempt running here takes it
        over (its heartbeat and its outcome then settle it), or one that ended already settles it
        as it decided. False: not a pushed attempt's, claim it as usual."""
        key = (job.task_id, job.dispatch_gen)
        ended = self._unsettled.pop(key, None)
        running = self.running.get(job.task_id)
        if ended is None and running is not None and running.msg is None and running.gen == job.dispatch_gen:
            running.msg = msg
            ended, running.unsettled = running.unsettled, None  # it ended while we read the message
            if ended is None:
                return True
        if ended is None:
            return False
        op, delay, at = ended
        if delay is not None:  # a retry's wait counts from the decision
            delay = max(0.0, delay - (time.monotonic() - at))
        await settle_message(op, msg, delay)
        return True

    async def run_pushed(self, pushed: spb.PushedJob) -> None:
        """Runs a job task_store pushed to this worker's offer: already claimed (RUN) for it."""
        started = time.perf_counter()
        job = pushed.job
        structlog.contextvars.bind_contextvars(lane="pushed")
        traceparent = tracing.enter(job.traceparent)
        structlog.contextvars.bind_contextvars(task_id=job.task_id, trace_id=tracing.trace_id(traceparent))
        await self._attempt(None, job, pushed.claim, started)

    async def _attempt(
        self, msg: Msg | None, job: spb.Job, claim: spb.ClaimTaskResponse, started: float
    ) -> None:
        """Runs the attempt a claim answered RUN, and settles it."""
        task_id = claim.task.id or job.task_id
        if task_id != job.task_id:
            # Fair share: the store started another tenant's first task instead and put this job
            # back in its backlog (ClaimTaskRequest.any_task); this message now carries that task.
            log.info("job_handed_over", instead=task_id)
            structlog.contextvars.bind_contextvars(task_id=task_id)
            self._carriers.add((job.task_id, job.dispatch_gen))
            FIRST_TURN.set(True)  # its provider calls go before those of jobs claimed earlier
        running = Attempt(msg, task_id, claim.attempt, gen=job.dispatch_gen)
        self.running[task_id] = running
        awaiting = self._awaiting.get((task_id, job.dispatch_gen)) if msg is None else None
        if awaiting is not None and not awaiting.done():
            awaiting.set_result(None)  # its message came first and waits for it: taken over now
        structlog.contextvars.bind_contextvars(attempt=claim.attempt)
        outcome = "unknown"
        try:
            outcome = await self._execute(running, claim.task)
        finally:
            self.running.pop(task_id, None)
            self._carriers.discard((job.task_id, job.dispatch_gen))
            if running.unsettled is not None:  # pushed, and its message has not come yet
                self._unsettled[(job.task_id, job.dispatch_gen)] = running.unsettled
                while len(self._unsettled) > _UNANSWERED_MAX:
                    del self._unsettled[next(iter(self._unsettled))]
            log.info(
                "job_finished",
                outcome=outcome,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
                deliveries=_delivered(running.msg),  # a pushed attempt's once it came
            )

    async def _execute(self, running: Attempt, task: task_pb2.Task) -> str:
        """Runs the handler and settles the attempt as it ended; returns the outcome."""
        ctx = AttemptContext(running, task, self._reporter, self._provider, self._media)
        # The claim already recorded 10 % "starting" (and the lease): no report needed here.
        running.sent_at = asyncio.get_running_loop().time()
        try:
            running.inner = asyncio.create_task(self._handle(ctx, running))
            result = await running.inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Shutting down past the grace period: hand the job back at once.
                await self._outcomes.hand_back(running)
                raise
            await self._outcomes.report_usage(running)  # what it paid for before it stopped
            await settle_attempt("ack", running)
            return "aborted"
        except JobAbortedError:
            await self._outcomes.report_usage(running)
            await settle_attempt("ack", running)
            return "aborted"
        except ProviderError as exc:
            return await self._outcomes.fail(running, provider_failure(exc), exc.failure.retry_after)
        except Exception as exc:
            log.exception("handler_crashed")
            return await self._outcomes.fail(running, crash_failure(exc), None)
        outcome = await self._outcomes.complete(running, result)
        if outcome == "completed":
            self.completed += 1
        return outcome

    async def _handle(self, ctx: AttemptContext, running: Attempt) -> Result:
        """The handler's run, then no more progress reports (whatever the outcome)."""
        try:
            return await self._handler.run(ctx)
        finally:
            await self._reporter.end(running)


def _delivered(msg: Msg | None) -> int:
    if msg is None:
        return 0  # pushed: no JetStream message
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 0
