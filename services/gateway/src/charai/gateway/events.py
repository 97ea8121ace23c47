"""One event fan-out per gateway: a single NATS subscription feeds every watcher of this process.

Live events are best effort; a watcher fills any gap from task_store's event log (each envelope
names the previous sequence of its task, so a gap is visible) and catches up when idle.

One bus message carries a whole commit batch (``EventBatch``): it is decoded once here and each
of its envelopes routed on its own. One event usually reaches several streams (ten browser tabs
on one character): it is serialized once by the first stream that sends it (:class:`LiveEvent`),
so the cost per extra stream is a queue append and a socket write, not a protobuf copy and encode.
A stream that fell behind takes everything queued at once (:meth:`Watcher.take`) and, when its
client opted in, sends it in one message (``charai.gateway.follow.pack``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Callable, ItemsView, Iterable, Mapping
from typing import TypeVar

import structlog
from charai.core import natsconn
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = structlog.get_logger("events")
QUEUE_LIMIT = 1024
#: How long the bus subscription outlives the gateway's last watch stream (a client that
#: reconnects at once finds it still there).
IDLE_UNSUBSCRIBE_SECONDS = 30.0
#: How long a new stream waits for the bus subscription to be registered before it goes on
#: without it (it then fills its gaps from the event log, as after any lost event).
READY_TIMEOUT = 2.0


@dataclasses.dataclass(eq=False, slots=True)
class LiveEvent:
    """One envelope as every watcher of this gateway receives it (the same object for all)."""

    env: spb.EventEnvelope
    _wire: bytes | None = None

    def wire(self, encode: Callable[[task_pb2.TaskEvent], bytes]) -> bytes:
        """The event's serialized stream response, encoded by the first caller and shared after.

        ``encode`` must not depend on the stream: every stream of this gateway that receives the
        event sends these bytes (the event is the tenant's own, and media URLs are signed with
        the gateway's base URL, not the caller's).
        """
        if self._wire is None:
            self._wire = encode(self.env.event)
        return self._wire


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclasses.dataclass(eq=False)
class Watcher:
    """One open watch stream's inbox.

    Not an ``asyncio.Queue``: the stream takes everything queued at once (:meth:`take`), and its
    idle timeout is one timer per wait instead of an ``asyncio.timeout`` scope per event; at
    20,000 deliveries a second that bookkeeping is a visible share of the gateway's CPU.
    """

    tenant: str
    task_id: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    task_type: int = 0
    #: For an access token that names its tasks: only events of these tasks (empty: no limit).
    task_ids: frozenset[str] = frozenset()
    #: Routed events not yet taken by the stream; ``None`` asks it to end (shutdown).
    inbox: collections.deque[LiveEvent | None] = dataclasses.field(default_factory=collections.deque)
    #: Set when the inbox overflowed: the stream must re-read the event log.
    lagged: bool = False
    _waiter: asyncio.Future[None] | None = None

    def matches(self, tenant: str, task: task_pb2.Task, pairs: ItemsView[str, str]) -> bool:
        """Whether an event of ``tenant`` about ``task`` belongs on this stream; ``pairs`` are the
        task's metadata items, copied out of the message once per event by the caller (a protobuf
        map lookup per watcher and key cost a tenth of the gateway's CPU at 1,000 streams)."""
        if tenant != self.tenant:
            return False
        if self.task_id:
            return task.id == self.task_id
        if self.task_type and task.type != self.task_type:
            return False
        if self.task_ids and task.id not in self.task_ids:
            return False
        return self.metadata.items() <= pairs

    def offer(self, event: LiveEvent) -> None:
        if len(self.inbox) >= QUEUE_LIMIT:
            self.lagged = True
            return
        self.inbox.append(event)
        if self._waiter is not None:
            _wake(self._waiter)

    def end(self) -> None:
        """Asks the stream to end after what it already has (past the limit: shutdown must get in)."""
        self.inbox.append(None)
        if self._waiter is not None:
            _wake(self._waiter)

    async def take(self, timeout: float) -> list[LiveEvent | None]:
        """Everything in the inbox, in arrival order, waiting up to ``timeout`` seconds for the
        first item; an empty list when none came (the stream is idle)."""
        if not self.inbox:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        items = list(self.inbox)
        self.inbox.clear()
        return items

    def clear(self) -> None:
        """Drops what is queued (the stream re-reads the log instead) and the lagged mark."""
        self.inbox.clear()
        self.lagged = False


K = TypeVar("K")


def _discard(index: dict[K, set[Watcher]], key: K, watcher: Watcher) -> None:
    group = index.get(key)
    if group is not None:
        group.discard(watcher)
        if not group:
            del index[key]


class EventHub:
    """Routes every event envelope to the watchers it matches.

    The bus subscription follows the watchers: made for the first watch stream (:meth:`ready`),
    dropped ``idle_seconds`` after the last one ended. A gateway nobody watches through (one
    that serves backends which poll, or webhooks' users) then receives and decodes no event at
    all: in bench B2, a tenth of the gateway's CPU per task.
    """

    def __init__(
        self, nc: Client | None, topology: Topology, idle_seconds: float = IDLE_UNSUBSCRIBE_SECONDS
    ) -> None:
        #: None: no bus (tests feed :meth:`_on_msg` directly).
        self._nc = nc
        self._topology = topology
        self._batch_subject = topology.events_subject
        self._by_task: dict[str, set[Watcher]] = {}
        self._filters: set[Watcher] = set()
        #: Filter watchers indexed by (tenant, one metadata key, its value), and those without a
        #: metadata filter by tenant: an event is checked only against watchers that can match it,
        #: not against every open stream (1,000 character galleries, one event: a few checks).
        self._by_pair: dict[tuple[str, str, str], set[Watcher]] = {}
        self._by_tenant: dict[str, set[Watcher]] = {}
        self._per_tenant: dict[str, int] = {}
        self._sub: Subscription | None = None
        #: The subscription being made (subscribe, then a round trip to NATS).
        self._subscribing: asyncio.Task[None] | None = None
        self._idle_seconds = idle_seconds
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: Bus subscriptions made so far (tests).
        self.subscriptions = 0

    @property
    def subscribed(self) -> bool:
        """Whether the bus subscription stands (or is being made)."""
        return self._sub is not None or self._subscribing is not None

    async def ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Returns once the bus subscription is registered with NATS, made now if there is none:
        a stream calls this after :meth:`add` and before it reads the event log, so no event
        committed in between misses both. Best effort: when NATS does not answer within
        ``timeout``, the stream goes on and fills its gaps from the log (it catches up when idle)."""
        if self._sub is not None and self._subscribing is None:
            return
        if self._nc is None or self._closed:
            return
        if self._subscribing is None:
            self._subscribing = asyncio.create_task(self._subscribe(), name="event-subscribe")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._subscribing)
        except Exception as exc:
            log.warning("event_subscription_not_ready", error=str(exc) or type(exc).__name__)

    async def _subscribe(self) -> None:
        assert self._nc is not None
        try:
            # The wildcard, not only the batch subject: see _on_msg.
            self._sub = await self._nc.subscribe(
                self._topology.events_wildcard, cb=self._on_msg, pending_msgs_limit=500_000
            )
            self.subscriptions += 1
            await natsconn.roundtrip(self._nc, timeout=int(READY_TIMEOUT))  # NATS has the SUB
        finally:
            self._subscribing = None

    def _unsubscribe_when_idle(self) -> None:
        self._idle_timer = None
        if self.open_streams or self._sub is None:
            return
        if self._subscribing is not None:  # its round trip is still out: look again later
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_seconds, self._unsubscribe_when_idle)
            return
        sub, self._sub = self._sub, None
        asyncio.get_running_loop().create_task(self._drop(sub))

    @staticmethod
    async def _drop(sub: Subscription) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def start(self) -> None:
        """Nothing to start: the bus subscription waits for the first watch stream (:meth:`ready`)."""

    async def close(self) -> None:
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._subscribing is not None:
            await asyncio.wait([self._subscribing])  # whatever it ended with
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await self._drop(sub)

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self._by_task.values()) + len(self._filters)

    def tenant_streams(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def add(self, watcher: Watcher) -> None:
        """Routes matching events to ``watcher`` from now on; the stream then awaits :meth:`ready`."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if watcher.task_id:
            self._by_task.setdefault(watcher.task_id, set()).add(watcher)
        else:
            self._filters.add(watcher)
            pair = self._pair(watcher)
            if pair is None:
                self._by_tenant.setdefault(watcher.tenant, set()).add(watcher)
            else:
                self._by_pair.setdefault(pair, set()).add(watcher)
        self._per_tenant[watcher.tenant] = self._per_tenant.get(watcher.tenant, 0) + 1

    def remove(self, watcher: Watcher) -> None:
        if watcher.task_id:
            group = self._by_task.get(watcher.task_id)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._by_task[watcher.task_id]
        else:
            self._filters.discard(watcher)
            pair = self._pair(watcher)
            if pair is None:
                _discard(self._by_tenant, watcher.tenant, watcher)
            else:
                _discard(self._by_pair, pair, watcher)
        left = self._per_tenant.get(watcher.tenant, 1) - 1
        if left <= 0:
            self._per_tenant.pop(watcher.tenant, None)
        else:
            self._per_tenant[watcher.tenant] = left
        if not self._per_tenant and self._sub is not None and self._idle_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_seconds, self._unsubscribe_when_idle)

    @staticmethod
    def _pair(watcher: Watcher) -> tuple[str, str, str] | None:
        """The index key of a filter watcher: its tenant and one of its metadata pairs."""
        if not watcher.metadata:
            return None
        key, value = min(watcher.metadata.items())
        return watcher.tenant, key, value

    def _candidates(self, tenant: str, pairs: ItemsView[str, str]) -> list[Watcher]:
        found = list(self._by_tenant.get(tenant, ()))
        for key, value in pairs:
            found.extend(self._by_pair.get((tenant, key, value), ()))
        return found

    def end_all(self) -> None:
        """Asks every open stream to end now (shutdown)."""
        for watchers in (*self._by_task.values(), self._filters):
            for watcher in watchers:
                watcher.end()

    async def _on_msg(self, msg: Msg) -> None:
        """One bus message: an ``EventBatch`` (decoded once, its envelopes routed in commit
        order), or on a per-task subject one ``EventEnvelope`` from a task_store of an earlier
        release (a rolling upgrade). A task_store publishes only one of the two forms, so no
        event reaches the hub twice (and a stream drops repeats by sequence anyway)."""
        try:
            if msg.subject == self._batch_subject:
                envelopes: Iterable[spb.EventEnvelope] = spb.EventBatch.FromString(msg.data).envelopes
            else:
                envelopes = (spb.EventEnvelope.FromString(msg.data),)
        except Exception:
            log.warning("event_unparseable", subject=msg.subject)
            return
        for env in envelopes:
            self._route(env)

    def _route(self, env: spb.EventEnvelope) -> None:
        """Offers one envelope to every watcher it matches, as one :class:`LiveEvent` they share."""
        event = LiveEvent(env)
        tenant, task = env.tenant, env.event.task
        pairs = dict(task.metadata).items()
        for watcher in self._by_task.get(task.id, ()):
            if watcher.matches(tenant, task, pairs):
                watcher.offer(event)
        for watcher in self._candidates(tenant, pairs):
            if watcher.matches(tenant, task, pairs):
                watcher.offer(event)
