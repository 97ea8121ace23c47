"""The releaser: moves held tasks into the outbox, in fair order, whenever the buffer of released
jobs has room (see :mod:`charai.task_store.backlog` for why tasks are held).

Room appears when a job is claimed or a task ends, so the releaser is woken by the events this
replica commits (a claim's ``started``, any end, a create that had to hold its task); it also
looks every ``poll_seconds`` by itself, for the claims and creates other replicas committed. A
wake-up costs nothing while nothing is held (no task was created since a look found none).
Every replica may run one: the lane's row lock makes them take turns (PostgreSQL); SQLite has
one writer anyway.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from charai.core.topology import KIND_BY_TYPE
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.store import TaskStore
from charai.tasks.v1 import task_pb2

log = structlog.get_logger("release")

#: The task types with lanes of their own.
KINDS = tuple(sorted(KIND_BY_TYPE))
_QUEUED = task_pb2.TASK_EVENT_TYPE_QUEUED
#: Events after which the buffer may have room (or a create held a task).
_WAKING = frozenset(
    {
        task_pb2.TASK_EVENT_TYPE_QUEUED,
        task_pb2.TASK_EVENT_TYPE_STARTED,
        task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        task_pb2.TASK_EVENT_TYPE_COMPLETED,
        task_pb2.TASK_EVENT_TYPE_FAILED,
        task_pb2.TASK_EVENT_TYPE_CANCELLED,
    }
)


class Releaser:
    """Releases held tasks of every task type while their buffers have room (``async with``)."""

    def __init__(self, store: TaskStore, poll_seconds: float = 1.0) -> None:
        self._store = store
        self._poll = poll_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Creates this replica committed (any may have held its task), and their number when a
        #: look last found nothing held (None: something is held).
        self._created = 0
        self._idle_at: int | None = None
        #: Tasks this releaser released (tests, metrics) and release passes it made.
        self.released = 0
        self.passes = 0

    def observe(self, envelopes: list[spb.EventEnvelope]) -> None:
        """Committed events (from the thread that committed them): wakes the releaser when
        they may have made room or held a task."""
        waking = False
        for env in envelopes:
            etype = env.event.type
            if etype == _QUEUED and env.prev_sequence == 0:
                self._created += 1  # after its commit: a look from now on sees its hold
            waking = waking or etype in _WAKING
        if waking:
            self.wake_threadsafe()

    def wake_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="fair-releaser")
        self._wake.set()  # whatever a previous run left held

    async def close(self) -> None:
        """Stops after the release in hand (it is one transaction); idempotent."""
        task, self._task = self._task, None
        self._loop = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Releaser:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            polled = False
            try:
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()
            except TimeoutError:
                polled = True
            self._wake.clear()
            try:
                await self.release_once(look=polled)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the next wake-up or poll retries
                log.warning("release_failed", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def release_once(self, look: bool = True) -> int:
        """Fills every buffer with room from the held tasks; returns how many were released.
        ``look=False`` (a wake-up): skipped while no task was created here since a look found
        nothing held (the periodic look covers other replicas' creates)."""
        created = self._created
        if not look and created == self._idle_at:
            return 0
        kinds = await self._store.held_kinds(KINDS)
        if not kinds:
            # Nothing held as of every create committed before this look began.
            self._idle_at = created
            return 0
        self._idle_at = None
        total = 0
        for kind in kinds:
            more = True
            while more:
                count, more = await self._store.release_held(kind)
                total += count
        self.released += total
        self.passes += 1
        return total
