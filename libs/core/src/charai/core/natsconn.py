"""NATS connection and JetStream set-up shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import nats
import nats.js.errors
import structlog
from charai.core.topology import Topology
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError

log = structlog.get_logger("nats")


async def connect(servers: Sequence[str], name: str, **options: Any) -> Client:
    """Connects with endless reconnects, so a NATS restart heals by itself."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    return await nats.connect(
        servers=list(servers),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **options,
    )


def write_now(nc: Client) -> bool:
    """Writes what ``nc`` has buffered to its socket now, not on its flusher's next turn; False
    when it left that to the flusher (nothing buffered, not connected, or reconnecting).

    Why: nats-py's ``publish`` appends to the client's buffer and wakes its flusher task, which
    writes on a later turn of the event loop, behind every callback already queued. Right after
    a create's commit, task_store's loop also writes the create's answer and the push (gRPC) and
    hands the job to the relay, so the started event waited behind them: 0.84 ms p50 from the
    event publisher to the gateway, against 0.40 ms for the same task's later events. Writing at
    once took B1's pickup p50 from 3.5-3.7 to 2.8-3.1 ms (BENCHMARKS.md, twelfth pass).

    It does what the flusher does, on nats-py's buffer (``_pending``, ``_pending_data_size``)
    and transport: internals of nats-py 2.x, checked here so that a release without them only
    loses the gain (``tests/integration/test_nats_write_now.py`` fails then, to say so). The
    flusher's own turn then finds nothing to write; a write the socket cannot take yet is kept
    by the transport's buffer, and the flusher's next write waits for it to drain, as before.
    """
    pending = getattr(nc, "_pending", None)
    transport = getattr(nc, "_transport", None)
    if not pending or not isinstance(pending, list) or transport is None:
        return False
    if not nc.is_connected or nc.is_reconnecting or not hasattr(nc, "_pending_data_size"):
        return False  # while reconnecting, nats-py keeps the buffer to send once connected
    transport.writelines(pending[:])
    nc._pending = []
    nc._pending_data_size = 0
    return True


async def roundtrip(nc: Client, timeout: int = 2) -> None:
    """Returns once NATS has processed everything ``nc`` sent before the call (a subscribe's SUB,
    a publish), or raises nats-py's flush timeout.

    Why not ``nc.flush()`` alone: nats-py writes its PING straight to the socket, ahead of what
    its buffer still holds, so the PONG can come back before the server has seen the commands
    sent just before (a subscription made and "flushed" could still miss a message published
    right after; ``tests/integration/test_event_subscription.py`` met it under load). The buffer
    is written first (:func:`write_now`), so the PING follows it.
    """
    write_now(nc)
    await nc.flush(timeout=timeout)


class AckedPublisher:
    """JetStream publishes that leave back to back and are acknowledged afterwards.

    :meth:`publish` queues one message on the connection and returns a future of its
    acknowledgement (``PubAck``), so several messages go out in the order they were published
    without a round trip between them; JetStream stores one connection's messages to a stream in
    that order. The replies come to one wildcard inbox of this publisher.

    Why not nats-py's ``JetStreamContext.publish_async``: its reply handler raises the error a
    refused message answers instead of setting it on the future (``APIError.from_error`` raises),
    so the future of a refused publish (a full stream, say) never settles.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[js_api.PubAck]] = {}
        self._next = 0

    @classmethod
    def of(cls, js: JetStreamContext) -> AckedPublisher:
        """A publisher on the connection ``js`` uses (nats-py keeps it in ``_nc``; no public
        accessor)."""
        return cls(js._nc)

    async def _inbox(self) -> str:
        if not self._prefix:
            async with self._lock:
                if not self._prefix:
                    prefix = self._nc.new_inbox() + "."
                    await self._nc.subscribe(prefix + "*", cb=self._on_reply)
                    self._prefix = prefix
        return self._prefix

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[js_api.PubAck]:
        """Queues the message; returns once it is queued, with the future of its PubAck (or of
        the error JetStream answered). Cancel the future to stop waiting for it."""
        prefix = await self._inbox()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[js_api.PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        future.add_done_callback(lambda _f: self._waiting.pop(token, None))
        try:
            await self._nc.publish(subject, payload, reply=prefix + token, headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    async def _on_reply(self, msg: Any) -> None:
        # Out of the book now, not by the done callback (that runs a loop turn later, when the
        # caller may already have read the answer and looked at what is left).
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(js_api.Header.STATUS) == "503":  # no stream listens
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            answer = json.loads(msg.data)
            if "error" in answer:
                nats.js.errors.APIError.from_error(answer["error"])  # raises the matching error
            future.set_result(js_api.PubAck.from_response(answer))
        except Exception as exc:
            future.set_exception(exc)


async def drain(nc: Client) -> None:
    """Drains ``nc`` (what it published is flushed, its subscriptions finish their messages) and
    closes it; a connection that is already closed, or whose server is away, is simply let go."""
    with contextlib.suppress(Exception):
        await nc.drain()


async def ensure_jobs_stream(js: JetStreamContext, topology: Topology, replicas: int = 1) -> None:
    """Creates (or updates) the work-queue stream that holds every job."""
    config = js_api.StreamConfig(
        name=topology.jobs_stream,
        subjects=[topology.jobs_subjects],
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=js_api.StorageType.FILE,
        discard=js_api.DiscardPolicy.NEW,
        max_msgs=5_000_000,
        duplicate_window=120.0,
        num_replicas=replicas,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def ensure_media_bucket(js: JetStreamContext, topology: Topology, replicas: int = 1) -> Any:
    """The object-store bucket that holds generated media."""
    try:
        return await js.object_store(topology.media_bucket)
    except (NotFoundError, Exception):
        try:
            return await js.create_object_store(
                topology.media_bucket,
                config=js_api.ObjectStoreConfig(
                    bucket=topology.media_bucket,
                    storage=js_api.StorageType.FILE,
                    replicas=replicas,
                    description="charai generated media",
                ),
            )
        except BadRequestError:
            return await js.object_store(topology.media_bucket)


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]], every: float = 0.2) -> None:
    """Cancels ``tasks`` and waits until each has ended, cancelling again while one runs on.

    Why again: nats-py swallows a cancellation that lands inside some of its awaits (a flush
    while subscribing, e.g. a KV watch being set up), so a task cancelled once there carries on
    and its next await would wait for ever; found as a task_store close that hung 1 time in 3.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks:  # retrieve outcomes, so none is logged as never retrieved
        if not task.cancelled():
            task.exception()
