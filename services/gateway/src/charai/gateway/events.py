"""One event fan-out per gateway: a single NATS subscription feeds every watcher of this process.

Live events are best effort; a watcher fills any gap from task_store's event log (each envelope
names the previous sequence of its task, so a gap is visible) and catches up when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import TypeVar

import structlog
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from nats.aio.client import Client
from nats.aio.msg import Msg

log = structlog.get_logger("events")
QUEUE_LIMIT = 1024


@dataclasses.dataclass(eq=False)
class Watcher:
    """One open watch stream's inbox."""

    tenant: str
    task_id: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    task_type: int = 0
    queue: asyncio.Queue[spb.EventEnvelope | None] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(QUEUE_LIMIT)
    )
    #: Set when the queue overflowed: the stream must re-read the event log.
    lagged: bool = False

    def matches(self, env: spb.EventEnvelope) -> bool:
        if env.tenant != self.tenant:
            return False
        task = env.event.task
        if self.task_id:
            return task.id == self.task_id
        if self.task_type and task.type != self.task_type:
            return False
        return all(task.metadata.get(k) == v for k, v in self.metadata.items())

    def offer(self, env: spb.EventEnvelope) -> None:
        try:
            self.queue.put_nowait(env)
        except asyncio.QueueFull:
            self.lagged = True


K = TypeVar("K")


def _discard(index: dict[K, set[Watcher]], key: K, watcher: Watcher) -> None:
    group = index.get(key)
    if group is not None:
        group.discard(watcher)
        if not group:
            del index[key]


class EventHub:
    """Routes every event envelope to the watchers it matches."""

    def __init__(self, nc: Client, topology: Topology) -> None:
        self._nc = nc
        self._topology = topology
        self._by_task: dict[str, set[Watcher]] = {}
        self._filters: set[Watcher] = set()
        #: Filter watchers indexed by (tenant, one metadata key, its value), and those without a
        #: metadata filter by tenant: an event is checked only against watchers that can match it,
        #: not against every open stream (1,000 character galleries, one event: a few checks).
        self._by_pair: dict[tuple[str, str, str], set[Watcher]] = {}
        self._by_tenant: dict[str, set[Watcher]] = {}
        self._per_tenant: dict[str, int] = {}
        self._sub: object | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self._topology.events_wildcard, cb=self._on_msg, pending_msgs_limit=500_000
        )

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self._by_task.values()) + len(self._filters)

    def tenant_streams(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def add(self, watcher: Watcher) -> None:
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

    @staticmethod
    def _pair(watcher: Watcher) -> tuple[str, str, str] | None:
        """The index key of a filter watcher: its tenant and one of its metadata pairs."""
        if not watcher.metadata:
            return None
        key, value = min(watcher.metadata.items())
        return watcher.tenant, key, value

    def _candidates(self, env: spb.EventEnvelope) -> list[Watcher]:
        found = list(self._by_tenant.get(env.tenant, ()))
        for key, value in env.event.task.metadata.items():
            found.extend(self._by_pair.get((env.tenant, key, value), ()))
        return found

    def end_all(self) -> None:
        """Asks every open stream to end now (shutdown): a ``None`` in each queue."""
        for watchers in (*self._by_task.values(), self._filters):
            for watcher in watchers:
                try:
                    watcher.queue.put_nowait(None)
                except asyncio.QueueFull:
                    watcher.lagged = True  # the stream re-checks ``stopping`` right after its catch-up

    async def _on_msg(self, msg: Msg) -> None:
        try:
            env = spb.EventEnvelope.FromString(msg.data)
        except Exception:
            log.warning("event_unparseable", subject=msg.subject)
            return
        for watcher in self._by_task.get(env.event.task.id, ()):
            if watcher.matches(env):
                watcher.offer(env)
        for watcher in self._candidates(env):
            if watcher.matches(env):
                watcher.offer(env)
