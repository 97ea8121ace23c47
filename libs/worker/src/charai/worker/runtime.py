"""The job runner shared by every worker kind.

One process holds up to ``concurrency`` jobs in flight, and no more than its provider gate lets
call at once plus a small prefetch (fair share: jobs it cannot run soon stay in task_store's fair
order instead of waiting inside the worker). Jobs come from three priority lanes
(durable pull consumers); whenever slots are free the runner probes the lanes in priority order
(with an occasional turn for the lower lanes, so low is never starved), and when every lane is
empty it long-polls all of them. Each delivered job is claimed from task_store (which fences
attempts), run by the handler, and acknowledged only after its result or failure is stored:
``ack`` when done, ``nak(delay)`` for a retry, ``term`` for a permanent failure. While every lane
long-polls, the runner offers its free slots to task_store (push dispatch, ``WorkerOffer``), which
then hands a new task's claim over on the ExchangeStream; the job's message, published after
the push, is taken over by that attempt when it arrives (:meth:`Jobs.run`).

What a fault costs (the fault tests in ``tests/faults`` hold the runner to this):

* task_store unreachable for a while: progress reports are skipped (best effort) and the
  outcome of a finished attempt is re-sent until it is recorded (``settle_seconds``), so work
  already paid for is not thrown away; the store deduplicates a repeat whose answer was lost.
* NATS unreachable: ``ack``/``nak`` may be lost; JetStream redelivers and the store's fencing
  turns the repeat into a no-op (``CLAIM_OUTCOME_DONE``) or a fresh attempt.
* SIGTERM: no new jobs; held jobs get the grace period, then are handed back through the store
  (``WORKER_LOST``, retried with backoff) so another worker need not wait for the lease to expire.
* SIGKILL: nothing runs; the lease expires and the next delivery starts a new attempt.

This module pulls and schedules jobs and keeps held ones alive; the parts live beside it: one
job's flow from claim to outcome (:mod:`charai.worker.jobs`), one attempt's state and JobContext
(:mod:`charai.worker.attempt`), its progress reports (:mod:`charai.worker.progress`), its outcome
and message settling (:mod:`charai.worker.outcome`), and the bound on task_store calls in flight
(:mod:`charai.worker.storecalls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import structlog
from charai.core import logs
from charai.core.media import MediaStore
from charai.core.storeclient import StoreClient
from charai.core.topology import KIND_BY_TYPE, LANES, Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.worker.attempt import Attempt
from charai.worker.context import Handler
from charai.worker.http import ProviderHttp
from charai.worker.jobs import Jobs
from charai.worker.lanes import Lane
from charai.worker.outcome import Outcomes
from charai.worker.progress import ProgressReporter
from charai.worker.storecalls import StoreCalls
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

log = structlog.get_logger("worker")

#: How soon a worker held back by its provider gate's limit looks again whether the limit grew.
_CAPPED_POLL = 0.05
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
    #: rest wait their turn in the worker (see :class:`charai.worker.storecalls.StoreCalls`).
    store_calls: int = 64
    #: Jobs claimed beyond what the provider gate lets call at once (see ``JobRunner._capacity``):
    #: a job whose call ended still holds its place while it stores the result, so with 2 a next
    #: job already waits at the gate then (bench F1, one run each: 1.15x the ideal makespan with
    #: 1, 1.08x with 2).
    prefetch: int = 2
    #: Push dispatch: while idle (every lane long-polling), offer the free slots to task_store,
    #: which then hands new tasks' claims over on the ExchangeStream (their jobs are still
    #: published, and taken over when they arrive) instead of leaving them to JetStream's
    #: delivery and a claim.
    push: bool = True


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
        self._ready: list[tuple[int, int, Lane, Msg]] = []
        self._counter = itertools.count()
        self._rounds = itertools.count()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        #: One per job this worker holds (claiming, running or settling): what ``_capacity`` bounds.
        self._job_tasks: set[asyncio.Task[Any]] = set()
        #: The messages of attempts pushed to this worker, being taken over (or waiting for their
        #: push): no slot of their own, the attempt holds one (while a push is on the way its slot
        #: looks free here, as it does before its message comes). Counted as jobs, 54 of them once
        #: kept a worker of 1,000 slots with 1,000 jobs from claiming its last one until a job
        #: ended (bench B3 at 1,000 in flight: a start ~0.6 s late, efficiency 0.79 -> 0.68).
        self._takeovers: set[asyncio.Task[Any]] = set()
        self._cancel_sub: Any = None
        self._closed = False
        self._calls = StoreCalls(config.store_calls)
        self._reporter = ProgressReporter(store, self._calls, config.progress_coalesce)
        outcomes = Outcomes(store, self._calls, config.settle_seconds, config.handback_timeout)
        self._outcomes = outcomes
        self._jobs = Jobs(
            handler, store, provider, media, config.worker_id, self._calls, self._reporter, outcomes
        )
        #: The task types this kind runs (what its offers name).
        self._types = sorted(t for t, kind in KIND_BY_TYPE.items() if kind == config.kind)
        #: Slots task_store was last told are free (each push spends one there too).
        self._offered = 0
        self._offer_changed = asyncio.Event()
        #: Every lane came back empty, and no job but a pushed attempt's message arrived since.
        self._idle = False
        self._pushes = config.push and store.pushes and bool(self._types)

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
        self._cancel_sub = await self._nc.subscribe(self._topology.cancel_wildcard, cb=self._jobs.on_cancel)
        self._tasks = [
            asyncio.create_task(self._schedule(), name=f"{self.config.kind}-scheduler"),
            asyncio.create_task(self._heartbeat(), name=f"{self.config.kind}-heartbeat"),
        ]
        if self._pushes:
            self._store.on_push(self._on_push)
            self._tasks.append(asyncio.create_task(self._offer(), name=f"{self.config.kind}-offers"))
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
        await self._withdraw()
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
        if self._job_tasks or self._takeovers:
            _, pending = await asyncio.wait(self._job_tasks | self._takeovers, timeout=grace)
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
        return len(self._jobs.running)

    @property
    def waiting(self) -> int:
        """Jobs delivered to this worker that wait here for a slot (not claimed yet)."""
        return len(self._ready)

    @property
    def completed(self) -> int:
        """Jobs completed by this runner."""
        return self._jobs.completed

    @property
    def store_calls(self) -> int:
        """task_store calls in flight now (metrics and tests)."""
        return self._calls.in_flight

    @property
    def store_calls_peak(self) -> int:
        """The most task_store calls in flight at once so far."""
        return self._calls.peak

    # -- scheduling --------------------------------------------------------------------------
    def _on_message(self, lane: Lane, msg: Msg) -> None:
        if self._jobs.pushed_here(msg):
            # The message of an attempt pushed to this worker: no slot of its own (the attempt
            # holds one), taken over at once (or held until its push is here); the worker
            # stays idle (its offer stands). The lane's long poll ended with it: the scheduler
            # polls again.
            task = asyncio.create_task(self._jobs.run(lane, msg))
            self._takeovers.add(task)
            task.add_done_callback(self._takeovers.discard)
            self._wake.set()
            return
        self._idle = False
        if self._stopping:
            task = asyncio.create_task(msg.nak())
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)
            return
        if len(self._job_tasks) < self._capacity():
            self._spawn(lane, msg)
        else:
            heapq.heappush(self._ready, (lane.rank, next(self._counter), lane, msg))
        self._offer_changed.set()  # busy: withdraw the offer
        self._wake.set()

    def _on_push(self, pushed: spb.PushedJob) -> None:
        """task_store pushed a job to this worker's offer: it is claimed for us already."""
        self._offered = max(0, self._offered - 1)  # the store spent the slot on its side
        if self._stopping:
            # Offered before the shutdown began: give it back at once (WORKER_LOST: retried).
            attempt = Attempt(None, pushed.claim.task.id or pushed.job.task_id, pushed.claim.attempt)
            task = asyncio.create_task(self._outcomes.hand_back(attempt))
        else:
            task = asyncio.create_task(self._jobs.run_pushed(pushed))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _spawn(self, lane: Lane, msg: Msg) -> None:
        task = asyncio.create_task(self._jobs.run(lane, msg))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._job_tasks.discard(task)
        self._start_ready()
        self._offer_changed.set()
        self._wake.set()

    def _start_ready(self) -> None:
        """Starts the delivered jobs that wait for a slot, while there is room: when a job ends,
        and when the capacity grew (the provider gate's limit rose: a trial call verified the
        key, a probe upward), which no job's end announces."""
        while self._ready and not self._stopping and len(self._job_tasks) < self._capacity():
            _, _, lane, msg = heapq.heappop(self._ready)
            self._spawn(lane, msg)

    def _capacity(self) -> int:
        """Jobs this worker holds at once: its concurrency, but no more than its provider gate
        lets call at once (``limit``, once a 429 taught it one) plus ``prefetch``.

        Why: a claimed job has started (its event, its turn in task_store's fair order spent).
        A worker that claims 64 jobs while the provider admits 2 calls keeps 62 of them waiting
        inside itself, first come first served, where fair share cannot reach them; left in the
        stream and in task_store's backlog, they keep their fair order. ``prefetch`` jobs are
        claimed ahead, so a call slot that frees is used at once.
        """
        limit = self.provider.gate.limit
        if limit is None:
            return self.config.concurrency
        return max(1, min(self.config.concurrency, limit + self.config.prefetch))

    def _free(self) -> int:
        return self._capacity() - len(self._job_tasks) - len(self._ready)

    async def _schedule(self) -> None:
        while not self._stopping:
            try:
                self._start_ready()
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
                        self._idle = True
                        self._offer_changed.set()  # idle: offer the free slots
                if got and self._free() > 0:
                    continue  # there may be more: probe again at once
                self._wake.clear()
                # Full only because the gate's limit caps the jobs: nothing wakes us when the
                # limit grows (a verified key, a probe upward), so look again soon.
                capped = free <= 0 and self._capacity() < self.config.concurrency
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CAPPED_POLL if capped else 1.0):
                        await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("schedule_failed", error=str(exc))
                await asyncio.sleep(0.5)

    # -- push dispatch ---------------------------------------------------------------------------
    def _wanted_offer(self) -> int:
        """Slots to offer: the free ones while idle (every lane came back empty and no job
        arrived since but its own pushed attempts' messages: nothing waits in JetStream for this
        worker, so a pushed job overtakes nobody), else none."""
        if self._stopping or self._ready or not self._idle:
            return 0
        return max(0, self._free())

    async def _offer(self) -> None:
        """Keeps task_store's view of this worker's free slots (``WorkerOffer``) current."""
        while True:
            await self._offer_changed.wait()
            self._offer_changed.clear()
            wanted = self._wanted_offer()
            if wanted == self._offered:
                continue
            try:
                sent = await self._store.offer(self.config.worker_id, self._types, wanted)
            except Exception as exc:  # the stream broke under the write: no offer stands
                log.warning("offer_failed", error=str(exc))
                sent = False
            self._offered = wanted if sent else 0

    async def _withdraw(self) -> None:
        """Takes the offer back before shutting down (best effort: a push that crossed it is
        handed back by :meth:`_on_push`)."""
        if self._pushes and self._offered:
            self._offered = 0
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.handback_timeout):
                    await self._store.offer(self.config.worker_id, self._types, 0)

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
                running = self._jobs.running
                held = [msg for _, _, _, msg in self._ready]
                held += [r.msg for r in running.values() if r.msg is not None]  # None: pushed
                for msg in held:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                if running and (renewals is None or renewals.done()):
                    renewals = asyncio.create_task(self._reporter.renew(list(running.values())))
        finally:
            if renewals is not None:
                renewals.cancel()
