"""After-commit work: publish events in commit order (one bus message per commit batch), relay
the outbox to JetStream, sweep for jobs that NATS lost. Each loop heals by itself after a NATS
outage."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import structlog
from charai.core import wire
from charai.core.clock import SYSTEM, Clock
from charai.core.natsconn import AckedPublisher, write_now
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.outbox import OutboxRow
from charai.task_store.store import TaskStore
from charai.tasks.v1 import task_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as JsNotFoundError

log = structlog.get_logger("dispatch")
#: How long a relay's batch waits for its jobs' PubAcks (all together).
PUBACK_TIMEOUT = 5.0
#: How long close() lets the relay finish the batch in hand (its PubAcks wait up to 5 s).
_STOP_TIMEOUT = 7.0


#: One bus message holds at most this many envelopes ...
BATCH_MAX_ENVELOPES = 256
#: ... and at most this many bytes, unless its one envelope is larger: well under NATS's
#: ``max_payload`` (1 MiB by default), which refuses the whole message, not part of it.
BATCH_MAX_BYTES = 512 * 1024


def event_batches(
    envelopes: list[spb.EventEnvelope],
    max_envelopes: int = BATCH_MAX_ENVELOPES,
    max_bytes: int = BATCH_MAX_BYTES,
) -> Iterator[tuple[bytes, list[spb.EventEnvelope]]]:
    """``envelopes`` as serialized ``EventBatch`` messages within the limits, in order, each with
    the envelopes it carries. Each envelope is encoded once; the batch is their concatenation."""
    parts: list[bytes] = []
    chunk: list[spb.EventEnvelope] = []
    size = 0
    for env in envelopes:
        framed = wire.message_field(1, env.SerializeToString())  # EventBatch.envelopes = 1
        if chunk and (len(chunk) >= max_envelopes or size + len(framed) > max_bytes):
            yield b"".join(parts), chunk
            parts, chunk, size = [], [], 0
        parts.append(framed)
        chunk.append(env)
        size += len(framed)
    if chunk:
        yield b"".join(parts), chunk


class EventPublisher:
    """Publishes event envelopes on core NATS, in the order the store committed them: one
    ``EventBatch`` message on ``Topology.events_subject`` for everything committed since the
    previous message (a group commit hands over many envelopes at once), not one per event, so
    the bus and every gateway pay per batch. Past the limits a batch is split, in order.

    Best effort by design: watchers fill any gap from the event log (the envelope carries the
    previous sequence of the same task, so a gap is visible).
    """

    def __init__(self, nc: Client, topology: Topology) -> None:
        self._nc = nc
        self._topology = topology
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        #: Envelopes handed over by the database thread, not yet published; one wake-up of the
        #: event loop publishes all of them.
        self._incoming: list[spb.EventEnvelope] = []
        self._incoming_lock = threading.Lock()
        self._ready = asyncio.Event()
        self._busy = False
        #: Messages published on the event bus (tests, metrics).
        self.messages = 0

    def submit_threadsafe(self, envelopes: list[spb.EventEnvelope]) -> None:
        """Called from the database thread right after commit (in commit order)."""
        with self._incoming_lock:
            wake = not self._incoming
            self._incoming.extend(envelopes)
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._incoming_lock:
                envelopes, self._incoming = self._incoming, []
            self._busy = True
            try:
                for data, chunk in event_batches(envelopes):
                    await self._publish(data, chunk)
            finally:
                self._busy = False

    async def _publish(self, data: bytes, chunk: list[spb.EventEnvelope]) -> None:
        """One batch, then a cancel notice for each CANCELLED event in it (the worker holding
        that task aborts; after the batch, so a watcher hears of the cancel no later)."""
        try:
            await self._nc.publish(self._topology.events_subject, data)
            self.messages += 1
            for env in chunk:
                if env.event.type == task_pb2.TASK_EVENT_TYPE_CANCELLED:
                    notice = spb.CancelNotice(task_id=env.event.task.id)
                    await self._nc.publish(
                        self._topology.cancel_subject(env.event.task.id), notice.SerializeToString()
                    )
            # On the socket before the writes queued on this loop meanwhile (the create's answer,
            # the push, the relay's job): watchers hear of a start without waiting for them.
            write_now(self._nc)
        except Exception as exc:
            log.warning(
                "event_publish_failed", error=str(exc), first_seq=chunk[0].event.sequence, events=len(chunk)
            )

    async def close(self) -> None:
        if self._task is not None:
            # Let handed-over events go out before we stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while self._incoming or self._ready.is_set() or self._busy:  # noqa: ASYNC110 - draining a list filled by another thread
                        await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class OutboxRelay:
    """Publishes outbox rows to JetStream (``Nats-Msg-Id`` = task id and dispatch generation),
    awaits each PubAck, then deletes the row. A crash in between re-publishes, and JetStream's
    duplicate window (or the store's claim fencing) absorbs the repeat.

    One write per batch: the rows a batch published are deleted (and their stream sequences
    recorded) in the transaction of the relay's next claim, which the relay makes at once; when
    that claim finds nothing, it still records them. A relay that stops records them with its
    give-back; one that dies before either re-publishes them after the claims expire (deduped).

    New jobs skip the claim: a create writes its job already claimed by this relay and hands it
    over in memory (``TaskStore.hand_off``; on SQLite before the commit's fsync, on PostgreSQL
    after the commit), so it is published one transaction sooner. Claims skip such a job until
    its short hand-off claim expires (a publish that failed is retried from a claim then).

    Several replicas may run a relay on one database: each claims the rows it publishes (for
    ``StoreConfig.outbox_claim_seconds``), so no row is published by two relays at once; a relay
    that stops gives its unpublished claims back, and a relay that dies loses them when they
    expire.
    """

    def __init__(
        self,
        store: TaskStore,
        js: JetStreamContext,
        topology: Topology,
        redispatch_after: float,
        sweep_interval: float,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._clock = clock
        self._js = js
        #: Publishes the jobs (on the connection of ``js``).
        self._publisher = AckedPublisher.of(js)
        self._topology = topology
        self._wake = asyncio.Event()
        self._redispatch_after = redispatch_after
        self._sweep_interval = sweep_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._loop = asyncio.get_running_loop()
        #: Who holds this relay's outbox claims (unique per relay, so per replica).
        self.owner = f"relay-{uuid.uuid4().hex[:12]}"
        #: Jobs this relay published and JetStream acknowledged, and how many of those JetStream
        #: recognised as duplicates (same ``Nats-Msg-Id``) and dropped.
        self.published = 0
        self.duplicates = 0
        #: Sweeps the relay's own loop completed (tests, metrics).
        self.sweeps = 0
        self._stopping = asyncio.Event()
        #: Jobs published and acknowledged whose outbox rows are not deleted yet: recorded by the
        #: next claim (or by close()).
        self._unmarked: list[tuple[OutboxRow, int]] = []
        #: Jobs handed over by the store right after their create committed, already claimed for
        #: this relay (``TaskStore.hand_off``), by outbox row id: published without a claim.
        self._handed: dict[int, OutboxRow] = {}
        #: Seconds the relay waits for a wake-up before it claims anyway (rows whose claims
        #: expired, rows a wake-up missed).
        self.poll_seconds = 1.0

    def take_threadsafe(self, rows: list[OutboxRow]) -> None:
        """Called by the store for a unit of work that queued jobs for this relay (see
        ``TaskStore.hand_off`` for when)."""
        self._loop.call_soon_threadsafe(self._take, rows)

    def _take(self, rows: list[OutboxRow]) -> None:
        for row in rows:
            self._handed[row.id] = row
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def wake_threadsafe(self) -> None:
        self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._relay(), name="outbox-relay"),
            asyncio.create_task(self._sweep(), name="dispatch-sweeper"),
        ]

    async def close(self) -> None:
        """Stops after the batch in hand (published), then records what it published and gives
        back what this relay still holds, in one transaction, so another replica publishes the
        rest at once rather than when the claims expire.

        The relay is not cancelled mid-batch: a claim committed after the give-back would keep
        its rows from the other replicas until it expired.
        """
        if not self._tasks:
            return
        relay, sweeper = self._tasks
        self._stopping.set()
        self._wake.set()
        sweeper.cancel()
        try:
            # A batch waits at most 5 s for its PubAcks; past that, cancel it.
            await asyncio.wait_for(relay, timeout=_STOP_TIMEOUT)
        except TimeoutError:
            log.warning("outbox_relay_stop_timeout", timeout=_STOP_TIMEOUT)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        try:
            await self._store.release_dispatches(self.owner, self._unmarked)
            self._unmarked = []
        except Exception as exc:  # the database is gone: the claims expire by themselves
            log.warning("outbox_release_failed", error=str(exc))

    async def _relay(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            try:
                while not self._stopping.is_set():
                    # Cleared before each batch, not once per wake-up: a job handed over while a
                    # batch is published or claimed is taken by the next batch of this loop, and
                    # the wake-up it left behind would cost one more (empty) claim afterwards.
                    self._wake.clear()
                    if not (rows := await self._next_batch()):
                        break
                    await self._publish(rows)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_publish_failed", error=str(exc), retry_in=backoff)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):  # close() cuts the wait short
                        await self._stopping.wait()
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def _next_batch(self) -> list[OutboxRow]:
        """Handed-over jobs first (no transaction before publishing them), then claimed ones."""
        if self._handed:
            rows = list(self._handed.values())
            self._handed.clear()
            return rows
        return await self._claim()

    async def _claim(self) -> list[OutboxRow]:
        """The next batch; the transaction also records the previous batch's published jobs."""
        sent = self._unmarked
        rows = await self._store.claim_dispatches(self.owner, sent=sent)
        self._unmarked = []  # committed (a failed claim keeps them for the next one)
        return rows

    async def _publish(self, rows: list[OutboxRow]) -> None:
        """Publishes a batch; the acknowledged jobs wait in ``_unmarked`` for the next claim.

        The batch's messages leave back to back (:class:`AckedPublisher`), then their PubAcks
        are awaited together, for at most ``PUBACK_TIMEOUT``: one future per job, no task and
        no timer of its own (what ``js.publish`` per job cost). A job not acknowledged in time,
        or refused, stays unrecorded and is published again from a claim."""
        sent: list[tuple[OutboxRow, asyncio.Future[Any]]] = []
        failed: BaseException | None = None
        try:
            for row in rows:
                headers = {"Nats-Msg-Id": f"{row.task_id}:{row.dispatch_gen}"}
                traceparent = spb.Job.FromString(row.payload).traceparent
                if traceparent:
                    headers["traceparent"] = traceparent
                sent.append((row, await self._publisher.publish(row.subject, row.payload, headers)))
        except asyncio.CancelledError:
            for _, ack in sent:
                ack.cancel()
            raise
        except Exception as exc:  # not connected, say: what was sent is still awaited
            failed = exc
        if sent:
            acks = [ack for _, ack in sent]
            try:
                await asyncio.wait(acks, timeout=PUBACK_TIMEOUT)
            finally:
                for ack in acks:
                    ack.cancel()  # those still waiting (a done one ignores it)
        for row, ack in sent:
            if ack.cancelled():
                failed = failed or TimeoutError(f"no PubAck within {PUBACK_TIMEOUT:g} s")
            elif (error := ack.exception()) is not None:
                failed = failed or error
            else:
                self.published += 1
                if ack.result().duplicate:
                    self.duplicates += 1
                self._unmarked.append((row, int(ack.result().seq)))
        if failed is not None:
            raise failed

    async def _sweep(self) -> None:
        while True:
            await self._clock.sleep(self._sweep_interval)
            try:
                await self.sweep_once()
                self.sweeps += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sweep_failed", error=str(exc))

    async def sweep_once(self) -> int:
        """Re-dispatches unfinished tasks whose job is no longer in the stream; returns how many."""
        redispatched = 0
        # Claimed: another replica's sweeper skips these for the next redispatch_after seconds,
        # and so do we when the job turns out to be still there.
        for task_id, gen, seq in await self._store.stale_dispatches(self._redispatch_after):
            if seq is not None and await self._job_in_stream(task_id, int(seq)):
                continue
            if await self._store.redispatch(task_id, gen):
                redispatched += 1
                log.warning("job_redispatched", task_id=task_id, previous_gen=gen)
        redispatched += await self._sweep_webhooks()
        if redispatched:
            self.wake()
        return redispatched

    async def _sweep_webhooks(self) -> int:
        """The same for webhook deliveries whose job nobody took long after it was due."""
        redispatched = 0
        webhooks = self._store.webhooks
        for delivery_id, gen, seq in await webhooks.stale(self._redispatch_after):
            if seq is not None and await self._webhook_job_in_stream(delivery_id, seq):
                continue
            if await webhooks.redispatch(delivery_id, gen):
                redispatched += 1
                log.warning("webhook_redispatched", delivery_id=delivery_id, previous_gen=gen)
        return redispatched

    async def _webhook_job_in_stream(self, delivery_id: str, seq: int) -> bool:
        try:
            msg = await self._js.get_msg(self._topology.jobs_stream, seq)
        except JsNotFoundError:
            return False
        return spb.WebhookJob.FromString(msg.data or b"").delivery_id == delivery_id

    async def _job_in_stream(self, task_id: str, seq: int) -> bool:
        try:
            msg = await self._js.get_msg(self._topology.jobs_stream, seq)
        except JsNotFoundError:
            return False
        data = msg.data or b""
        return spb.Job.FromString(data).task_id == task_id
