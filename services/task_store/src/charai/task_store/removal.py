"""Removing ended tasks: DeleteTask, and the retention sweeper that deletes them after N days.

Media first, rows second. A media object has no row of its own to hold it in a transaction, so
the order is what keeps the rule "a deleted task's media URLs answer 404": if the process dies
between the two steps the task is still listed (its media already gone), and deleting it again
finishes the job. The other order could leave media nobody can find any more.

A media object may belong to several tasks: a task that reused an identical request's result
points to the same object (:mod:`charai.task_store.reuse`). Removing one of them keeps the object
while another task still points to it; the last one removed takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog
from charai.core.clock import SYSTEM, Clock
from charai.core.errors import NotFoundError, TaskNotFinishedError
from charai.core.media import media_keys
from charai.task_store.store import TaskStore

log = structlog.get_logger("retention")


class MediaRemover(Protocol):
    async def delete(self, key: str) -> None: ...


async def remove_task(store: TaskStore, media: MediaRemover | None, tenant: str, task_id: str) -> bool:
    """Deletes an ended task of ``tenant``: its media objects, then its rows and events. Raises
    NOT_FOUND for an unknown or foreign task and FAILED_PRECONDITION for one still queued or
    running; False when a concurrent delete removed it first."""
    task = await store.deletable(tenant, task_id)
    keys = media_keys(task)
    if media is not None and keys:
        shared = await store.shared_media(tenant, task_id)
        for key in keys:
            if key not in shared:
                await media.delete(key)
    return await store.delete(tenant, task_id)


class RetentionSweeper:
    """Deletes ended tasks (and their media) ``days`` after their last change; off when 0."""

    def __init__(
        self,
        store: TaskStore,
        media: MediaRemover | None,
        days: float,
        clock: Clock = SYSTEM,
        interval_seconds: float = 60.0,
        batch: int = 200,
    ) -> None:
        self._store = store
        self._media = media
        self._keep_us = int(days * 86_400 * 1_000_000)
        self._clock = clock
        self._interval = interval_seconds
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        #: Tasks this sweeper deleted (tests, logs).
        self.deleted = 0

    async def sweep_once(self) -> int:
        """Deletes every task past retention now, in batches; returns how many."""
        removed = 0
        while True:
            cutoff = self._clock.now_us() - self._keep_us
            batch = await self._store.ended_before(cutoff, self._batch)
            for tenant, task in batch:
                try:
                    removed += await remove_task(self._store, self._media, tenant, task.id)
                except (NotFoundError, TaskNotFinishedError):
                    continue  # deleted, or re-run by an operator, since it was listed
            if len(batch) < self._batch:
                break
        if removed:
            log.info("retention_deleted", tasks=removed)
        self.deleted += removed
        return removed

    def start(self) -> None:
        if self._keep_us > 0:
            self._task = asyncio.create_task(self._run(), name="retention-sweeper")

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or NATS is away: next round
                log.warning("retention_sweep_failed", error=str(exc))
            await self._clock.sleep(self._interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
