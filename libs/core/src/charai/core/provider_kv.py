"""The NATS KV bucket of the provider credentials' shared records (limiter, breaker, holdings).

No new infrastructure: a JetStream key-value bucket, one key per credential and model, each
value a :mod:`charai.core.domain.provider_record` JSON record, changed only by compare-and-set
(an update that names the revision it read; a concurrent writer's update makes it fail, and the
writer re-reads and re-applies). Workers write; task_store (GetQueueStats) and the gateway
(health) only read, through :class:`ProviderStates`, a live view kept by a KV watch.

A record not written for :data:`BUCKET_TTL` (no worker uses the credential any more) expires.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from charai.core import natsconn
from charai.core.clock import SYSTEM, Clock
from charai.core.domain import provider_limit as lim
from charai.core.domain.breaker import BreakerState
from charai.core.domain.provider_record import ProviderRecord, decode, encode
from charai.core.topology import Topology
from charai.tasks.v1 import task_pb2, task_service_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = structlog.get_logger("providers")

#: Seconds a record lives after its last write (every worker using it writes every few seconds).
BUCKET_TTL = 24 * 3600.0


class ConflictError(Exception):
    """A compare-and-set lost: the record changed since it was read."""


async def ensure_providers_bucket(js: JetStreamContext, topology: Topology, replicas: int = 1) -> KeyValue:
    """The providers bucket, created on first use (by whichever process comes first)."""
    try:
        return await js.key_value(topology.providers_bucket)
    except BucketNotFoundError:
        pass
    config = js_api.KeyValueConfig(
        bucket=topology.providers_bucket,
        description="charai provider limiters and breakers",
        history=1,
        ttl=BUCKET_TTL,
        storage=js_api.StorageType.FILE,
        replicas=replicas,
    )
    try:
        return await js.create_key_value(config)
    except BadRequestError:  # created meanwhile by another process
        return await js.key_value(topology.providers_bucket)


class RecordStore:
    """One record's key: read, compare-and-set, watch."""

    def __init__(self, kv: KeyValue, key: str) -> None:
        self._kv = kv
        self.key = key

    async def load(self) -> tuple[int, ProviderRecord | None]:
        """The current revision and record (``(0, None)`` when there is none)."""
        try:
            entry = await self._kv.get(self.key)
        except KeyNotFoundError:
            return 0, None
        return entry.revision or 0, _decoded(entry.value)

    async def write(self, record: ProviderRecord, revision: int) -> int:
        """Writes ``record`` if the key is still at ``revision`` (0: if it has no record);
        returns the new revision.

        Raises:
            ConflictError: the key moved on (or was created meanwhile).
        """
        try:
            if revision == 0:
                return int(await self._kv.create(self.key, encode(record)))
            return int(await self._kv.update(self.key, encode(record), last=revision))
        except KeyWrongLastSequenceError:
            raise ConflictError(self.key) from None

    async def watch(self) -> AsyncIterator[tuple[int, ProviderRecord | None]]:
        """Every change of the key from now on (the current value first): ``(revision, record)``,
        ``record`` ``None`` when it was deleted or expired. Ends only by cancellation or error."""
        watcher = await self._kv.watch(self.key)
        try:
            async for entry in watcher:
                if entry is None:  # "the current values have been delivered"
                    continue
                gone = entry.operation in (KV_DEL, KV_PURGE) or not entry.value
                yield entry.revision or 0, None if gone else _decoded(entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


def _decoded(value: bytes | None) -> ProviderRecord | None:
    try:
        return decode(value or b"")
    except ValueError:
        log.warning("provider_record_unreadable")
        return None


#: A holder that has not written for this long is not counted among a credential's workers
#: (its worker crashed; the others drop it from the record after their lease).
STALE_HOLDER = 60.0
_BREAKER_STATES = {
    BreakerState.CLOSED: task_service_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: task_service_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: task_service_pb2.BREAKER_STATE_HALF_OPEN,
}
_TYPES = {"image": task_pb2.TASK_TYPE_IMAGE_GENERATION, "tts": task_pb2.TASK_TYPE_TTS_GENERATION}


def to_proto(record: ProviderRecord, now: float) -> task_service_pb2.ProviderState:
    """A record as the API shows it (GetQueueStats ``providers``)."""
    limiter, breaker = record.limiter, record.breaker
    state = task_service_pb2.ProviderState(
        credential_id=record.credential,
        type=_TYPES.get(record.kind, task_pb2.TASK_TYPE_UNSPECIFIED),
        dialect=record.dialect,
        model=record.model,
        breaker_state=_BREAKER_STATES[breaker.state],
        breaker_reason=breaker.reason,  # type: ignore[arg-type]  # ErrorKind values = ErrorCode
        breaker_message=breaker.message,
        limit=lim.cap(limiter) or 0,
        in_flight=record.in_flight,
        rate_per_second=lim.rate_at(limiter, now) or 0.0,
        workers=_workers(record, now),
        verified=limiter.verified,
    )
    if breaker.state is not BreakerState.CLOSED:
        state.breaker_retry_time.FromMicroseconds(round(breaker.retry_at * 1e6))
    if limiter.paused_until > now:
        state.paused_until.FromMicroseconds(round(limiter.paused_until * 1e6))
    return state


def _workers(record: ProviderRecord, now: float) -> int:
    return sum(1 for h in record.holders.values() if now - h.seen <= STALE_HOLDER)


class ProviderStates:
    """A live view of every provider record (a KV watch over the bucket), for the readers:
    GetQueueStats and health. ``async with`` starts it; ``close()`` is idempotent.

    The watch restarts by itself after an error (NATS away); meanwhile the last view stays.
    """

    def __init__(self, nc: Client, topology: Topology, replicas: int = 1, clock: Clock = SYSTEM) -> None:
        self._nc = nc
        self._topology = topology
        self._replicas = replicas
        self._clock = clock
        self._records: dict[str, ProviderRecord] = {}
        self._task: asyncio.Task[None] | None = None
        #: Set once the current values have been read (tests and the first GetQueueStats wait on it).
        self.ready = asyncio.Event()

    def records(self) -> list[ProviderRecord]:
        """The credentials in use (a worker has written lately), by kind, model and credential.

        A credential nobody uses any more (its workers restarted with another key) keeps its
        record until the bucket's TTL (so a worker started again with it finds its breaker),
        but it is not shown, nor does it make health degraded."""
        now = self._clock.time()
        used = [r for r in self._records.values() if _workers(r, now)]
        return sorted(used, key=lambda r: (r.kind, r.model, r.credential))

    def protos(self) -> list[task_service_pb2.ProviderState]:
        """Every record as GetQueueStats reports it."""
        now = self._clock.time()
        return [to_proto(r, now) for r in self.records()]

    def open_breakers(self) -> list[str]:
        """One line per credential whose breaker is not closed (health says "degraded")."""
        return [
            f"{r.kind} provider {r.credential} ({r.model}): breaker {r.breaker.state.value}"
            + (f" ({r.breaker.kind.name})" if r.breaker.kind is not None else "")
            for r in self.records()
            if r.breaker.state is not BreakerState.CLOSED
        ]

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="provider-states")

    async def _run(self) -> None:
        while True:
            try:
                kv = await ensure_providers_bucket(self._nc.jetstream(), self._topology, self._replicas)
                watcher = await kv.watchall()
                try:
                    async for entry in watcher:
                        if entry is None:
                            self.ready.set()
                            continue
                        record = None if entry.operation in (KV_DEL, KV_PURGE) else _decoded(entry.value)
                        if record is None:
                            self._records.pop(entry.key, None)
                        else:
                            self._records[entry.key] = record
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("provider_states_watch_failed", error=type(exc).__name__)
            await self._clock.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await natsconn.cancel_and_wait([task])

    async def __aenter__(self) -> ProviderStates:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
