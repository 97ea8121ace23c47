"""The delivery loop: pull due deliveries from JetStream, claim each in task_store, post it,
report the answer, and settle the message as the store decided (ack, or nak with the delay of
the next attempt: JetStream holds the schedule, task_store the truth)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from urllib.parse import urlsplit

import grpc
import structlog
from charai.core.clock import Clock, SystemClock
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from charai.webhook_sender import post as attempt
from charai.webhook_sender.receivers import Receivers, park_delay
from charai.worker.egress import CachedResolve, Resolve, system_resolve
from charai.worker.outcome import settle_message
from google.protobuf import duration_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, FetchTimeoutError

log = structlog.get_logger("webhook_sender")

#: Delay before a job whose claim or settle could not reach task_store is tried again.
STORE_RETRY_SECONDS = 1.0
#: Delivery jobs delivered and not yet acknowledged, at most (JetStream's consumer setting). A
#: delivery waiting for its next attempt is one of them: its message was nak'd with the delay,
#: and JetStream counts it until it is acknowledged. A bound of a few times the concurrency
#: (256) let one receiver failing for 256 tasks stall every tenant's deliveries until the
#: first of those delays ended (minutes to hours); the sender pulls only what its free slots
#: can take, so the bound is not its flow control. As the workers' consumers.
MAX_ACK_PENDING = 100_000


class Sender:
    """Posts deliveries, at most ``concurrency`` at once."""

    def __init__(
        self,
        js: JetStreamContext,
        store: StoreClient,
        topology: Topology,
        *,
        sender_id: str,
        present: Callable[[task_pb2.Task], task_pb2.Task],
        concurrency: int = 64,
        timeout: float = 15.0,
        allow_private: bool = False,
        ack_wait: float = 60.0,
        replicas: int = 1,
        resolve: Resolve = system_resolve,
        observe: Callable[[str, str, float], None] | None = None,
        receiver_concurrency: int = 32,
        clock: Clock | None = None,
        parked: Callable[[str], None] | None = None,
    ) -> None:
        self._js = js
        #: Called with (endpoint host, outcome, seconds) after each attempt (metrics).
        self._observe = observe
        #: Each receiver's share of the slots (:mod:`charai.webhook_sender.receivers`).
        self.receivers = Receivers(receiver_concurrency, clock or SystemClock())
        #: Called with the receiver of each delivery put back to wait (metrics).
        self._on_parked = parked
        #: Deliveries put back to wait, their receiver having its share (tests, metrics).
        self.parked = 0
        self._store = store
        self._topology = topology
        self._sender_id = sender_id
        self._present = present
        self._concurrency = concurrency
        self._timeout = timeout
        self._allow_private = allow_private
        self._ack_wait = ack_wait
        self._replicas = replicas
        #: Lookups kept 10 s: a receiver's deliveries do not each wait for one.
        self._resolve = CachedResolve(resolve)
        self._slots = asyncio.Semaphore(concurrency)
        #: Kept-alive connections to the receivers (bounded by the slots).
        self.connections = attempt.Connections()
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        #: Attempts made and deliveries that ended delivered (tests, logs).
        self.attempts = 0
        self.delivered = 0

    async def start(self) -> None:
        config = js_api.ConsumerConfig(
            durable_name=self._topology.webhook_consumer,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=self._topology.webhook_subject,
            num_replicas=self._replicas,
        )
        try:
            # Creates the consumer, or updates one an older sender created (its max_ack_pending).
            await self._js.add_consumer(self._topology.jobs_stream, config)
        except BadRequestError as exc:
            # Another sender created it with other settings; use it as it is.
            log.warning("consumer_config_differs", consumer=config.durable_name, error=str(exc))
        self._sub = await self._js.pull_subscribe(
            self._topology.webhook_subject,
            durable=self._topology.webhook_consumer,
            stream=self._topology.jobs_stream,
        )
        self._loop_task = asyncio.create_task(self._pull(), name="webhook-pull")

    async def close(self, grace: float = 10.0) -> None:
        """Stops pulling; deliveries being posted finish within ``grace`` (else JetStream
        redelivers them after the ack wait, with the same webhook-id)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
            # A fetch cancelled above leaves its pull request standing on the server (up to its
            # 5 s): a job published meanwhile lands in this subscription, where nobody takes it,
            # and the connection's drain waited for it until nats-py gave up (30 s, beyond the
            # shutdown grace). Unsubscribed, such a job is simply redelivered after the ack wait.
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace)
        for task in list(self._inflight):
            task.cancel()
        await self.connections.close()

    async def _pull(self) -> None:
        while True:
            await self._slots.acquire()
            free = 1
            while free < 32 and not self._slots.locked():
                await self._slots.acquire()
                free += 1
            try:
                msgs = await self._sub.fetch(batch=free, timeout=5.0)
            except (FetchTimeoutError, TimeoutError):
                msgs = []
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook_fetch_failed", error=str(exc) or type(exc).__name__)
                msgs = []
                await asyncio.sleep(0.5)
            for _ in range(free - len(msgs)):
                self._slots.release()
            for msg in msgs:
                task = asyncio.create_task(self._one(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _one(self, msg: Msg) -> None:
        job = spb.WebhookJob.FromString(msg.data)
        started = self.receivers.admit(job.host)
        if started is None:  # its receiver has its share: the job waits in JetStream, not in a slot
            self.parked += 1
            if self._on_parked is not None:
                self._on_parked(job.host)
            await settle_message("nak", msg, park_delay(_delivered(msg)))
            return
        post_seconds = None
        try:
            post_seconds = await self._deliver(msg, job.delivery_id)
        finally:
            self.receivers.done(job.host, started, post_seconds)

    async def _deliver(self, msg: Msg, delivery_id: str) -> float | None:
        """Claims, posts and settles one delivery; how long its post took (None: not posted)."""
        try:
            claim = await self._store.claim_webhook_delivery(delivery_id, self._sender_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("webhook_claim_failed", delivery_id=delivery_id, code=exc.code().name)
            await settle_message("nak", msg, STORE_RETRY_SECONDS)
            return None
        if claim.outcome == spb.CLAIM_OUTCOME_DONE:
            await settle_message("ack", msg)
            return None
        if claim.outcome == spb.CLAIM_OUTCOME_DEFER:
            await settle_message("nak", msg, max(0.05, claim.retry_after_seconds))
            return None
        answer = await self._send(delivery_id, claim)
        request = spb.SettleWebhookDeliveryRequest(
            delivery_id=delivery_id,
            sender_id=self._sender_id,
            http_status=answer.http_status,
            latency=duration_pb2.Duration(seconds=int(answer.latency), nanos=int((answer.latency % 1) * 1e9)),
            error=answer.error,
            retry_after_seconds=-1.0 if answer.retry_after is None else answer.retry_after,
        )
        try:
            settled = await self._store.settle_webhook_delivery(request)
        except grpc.aio.AioRpcError as exc:
            # Unrecorded: the claim expires and the delivery goes again (same webhook-id).
            log.warning("webhook_settle_failed", delivery_id=delivery_id, code=exc.code().name)
            await settle_message("nak", msg, STORE_RETRY_SECONDS)
            return answer.latency
        if settled.outcome == spb.SETTLE_OUTCOME_RETRY:
            await settle_message("nak", msg, max(0.0, settled.retry_after_seconds))
        else:
            await settle_message("ack", msg)
        return answer.latency

    async def _send(self, delivery_id: str, claim: spb.ClaimWebhookDeliveryResponse) -> attempt.Answer:
        body = attempt.payload(claim, self._present)
        head = attempt.headers(delivery_id, claim.secrets, body, dt.datetime.now(dt.UTC))
        answer = await attempt.post(
            claim.url,
            head,
            body,
            connections=self.connections,
            timeout=self._timeout,
            allow_private=self._allow_private,
            resolve=self._resolve,
        )
        self.attempts += 1
        if 200 <= answer.http_status < 300:
            self.delivered += 1
        host = _host(claim.url)
        if self._observe is not None:
            outcome = {0: "none", attempt.REFUSED: "refused"}.get(answer.http_status, str(answer.http_status))
            self._observe(host, outcome, answer.latency)
        log.info(
            "webhook_attempt",
            delivery_id=delivery_id,
            task_id=claim.event.task.id,
            event_type=claim.event_type,
            attempt=claim.attempt,
            http_status=answer.http_status,
            latency_ms=round(answer.latency * 1000, 1),
            error=answer.error or None,
            host=host,
        )
        return answer


def _delivered(msg: Msg) -> int:
    """How many times JetStream has delivered the message (1 for its first time)."""
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message's reply subject
        return 1


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""
