"""One watch stream's events, each exactly once: the log replayed after a floor, then live.

The live events come from the stream's :class:`~charai.gateway.events.Watcher`; the log is
task_store's (ListEvents), read again whenever the live feed may have missed something (the
watcher lagged, an event arrived whose predecessor never did, or the stream was idle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

from charai.core.storeclient import StoreClient
from charai.core.wire import move_field
from charai.gateway.events import LiveEvent, Watcher
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2

#: task_store's deadline for one page of the log.
LOG_TIMEOUT = 30.0
#: What :meth:`Follower._accept` answers for a live event whose predecessor never arrived.
_GAP: tuple[int, bytes] = (0, b"")


#: A page of the log stops before this many bytes of events (``ListEventsRequest.max_bytes``):
#: each event carries its whole task, and 500 events of large tasks made a 26 MB message.
LOG_PAGE_BYTES = 4 * 1024 * 1024


async def read_log(
    store: StoreClient, request: spb.ListEventsRequest
) -> tuple[list[task_pb2.TaskEvent], int]:
    """All events after ``request.after_sequence`` (paged), and the store's head sequence."""
    events: list[task_pb2.TaskEvent] = []
    request.max_bytes = LOG_PAGE_BYTES
    while True:
        response = await store.list_events(request, timeout=LOG_TIMEOUT)
        events.extend(response.events)
        if not response.more and len(response.events) < (request.limit or 500):
            return events, response.head_sequence
        request.after_sequence = response.events[-1].sequence


#: One item of a watch stream: an event's type and its serialized stream response.
Item = tuple[int, bytes]
#: A packed stream message stays under this size unless its one event is larger (a gRPC client's
#: default limit on a received message is 4 MiB).
MAX_MESSAGE_BYTES = 512 * 1024
_EVENT, _EVENTS = 1, 2  # WatchTask(s)Response.event, .events


def pack(items: list[Item], max_events: int) -> Iterator[bytes]:
    """The stream messages for ``items`` (ready to send at once, in order): one per item when the
    client did not opt in (``max_events`` < 2), else up to ``max_events`` of them per message in
    ``events``, within :data:`MAX_MESSAGE_BYTES`; a lone item keeps the form ``event``.

    Each item's bytes are a response holding only ``event`` (shared by every stream that sends
    the event), so a packed message is their concatenation with each tag moved to ``events``.
    """
    if max_events < 2:
        for _, data in items:
            yield data
        return
    start = 0
    while start < len(items):
        end, size = start, 0
        while end < len(items) and end - start < max_events:
            size += len(items[end][1])
            if size > MAX_MESSAGE_BYTES and end > start:
                break
            end += 1
        if end - start == 1:
            yield items[start][1]
        else:
            yield b"".join(move_field(data, _EVENT, _EVENTS) for _, data in items[start:end])
        start = end


class Follower:
    """Replays the log after ``floor``, then follows live events, each exactly once and, per
    task, in sequence order; yields them in groups of (type, serialized stream response): what
    is ready to send at one time (a page of the log, or what arrived live while the previous
    group was being sent), which the stream may send as one message (:func:`pack`).

    ``floor``: every event up to it has been delivered (or was not wanted). ``seen`` holds the
    last delivered sequence of each task above the floor. A single-task stream keeps its floor
    at the task's last delivered event; a multi-task stream raises it to the log's head after
    each catch-up and tells the client in its heartbeats (the resume point).
    """

    def __init__(
        self,
        store: StoreClient,
        watcher: Watcher,
        query: spb.ListEventsRequest,
        floor: int,
        *,
        single_task: bool,
        wire: Callable[[task_pb2.TaskEvent], bytes],
        heartbeat_seconds: float,
        stopping: asyncio.Event,
    ) -> None:
        self._store = store
        self._watcher = watcher
        self._query = query
        self._floor = floor
        self._seen: dict[str, int] = {}
        self._single_task = single_task
        self._wire = wire
        self._heartbeat_seconds = heartbeat_seconds
        self._stopping = stopping

    async def stream(self) -> AsyncIterator[list[Item]]:
        """Groups of events, never empty; a heartbeat always comes alone."""
        if caught := await self._catch_up():
            yield caught
        if not self._single_task:
            # Tell the client at once that the watch is in place and from which sequence on it
            # is complete (the resume floor), instead of only after the first idle interval.
            yield [self._heartbeat()]
        watcher = self._watcher
        while not self._stopping.is_set():
            if watcher.lagged:
                watcher.clear()
                if caught := await self._catch_up():
                    yield caught
            # Everything that arrived while the previous group was being sent, in one go.
            batch = await watcher.take(self._heartbeat_seconds)
            if not batch:
                yield await self._catch_up() or [self._heartbeat()]
                continue
            group, ending = await self._live(batch)
            if group:
                yield group
            if ending:
                return  # the gateway is shutting down: end the stream, the client resumes elsewhere

    async def _live(self, batch: list[LiveEvent | None]) -> tuple[list[Item], bool]:
        """The events of a batch taken from the watcher still to deliver, in order (the log read
        where one's predecessor was missed), and whether the batch asks the stream to end."""
        group: list[Item] = []
        for live in batch:
            if live is None:
                return group, True
            accepted = self._accept(live)
            if accepted is _GAP:
                # The rest of the batch is then skipped as already delivered, or follows it.
                group.extend(await self._catch_up())
            elif accepted is not None:
                group.append(accepted)
        return group, False

    def _accept(self, live: LiveEvent) -> Item | None:
        """A live event to deliver, None when it was delivered already, or ``_GAP`` when the
        previous event of its task never reached us live (the log must be read)."""
        event = live.env.event
        known = self._seen.get(event.task.id, self._floor)
        if event.sequence <= known:
            return None  # already delivered (replay or catch-up)
        if live.env.prev_sequence > known:
            return _GAP
        self._seen[event.task.id] = event.sequence
        if self._single_task:
            self._floor = event.sequence
            self._seen.clear()
        return event.type, live.wire(self._wire)

    async def _catch_up(self) -> list[Item]:
        """The log after the floor, less what was delivered live; then the floor moves up."""
        floor, seen = self._floor, self._seen
        self._query.after_sequence = floor
        events, head = await read_log(self._store, self._query)
        only = self._watcher.task_ids
        missed: list[Item] = []
        for event in events:
            if only and event.task.id not in only:
                continue  # outside an access token's tasks (the log query cannot filter by id)
            if event.sequence > seen.get(event.task.id, floor):
                seen[event.task.id] = event.sequence
                missed.append((event.type, self._wire(event)))
        # Everything up to the head we read is now delivered; forget per-task marks below it.
        last = events[-1].sequence if events else floor
        self._floor = floor = max(floor, last, floor if self._single_task else head)
        for task_id in [t for t, s in seen.items() if s <= floor]:
            del seen[task_id]
        return missed

    def _heartbeat(self) -> Item:
        event = task_pb2.TaskEvent(type=task_pb2.TASK_EVENT_TYPE_HEARTBEAT, sequence=self._floor)
        event.time.GetCurrentTime()
        return event.type, self._wire(event)
