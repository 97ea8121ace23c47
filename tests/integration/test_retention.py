"""Removing ended tasks with their media: DeleteTask's path and the retention sweeper, on both
store backends and a real JetStream object-store bucket, on a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from charai.core import natsconn
from charai.core.errors import NotFoundError, TaskNotFinishedError
from charai.core.media import MediaStore
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.removal import RetentionSweeper, remove_task
from charai.tasks.v1 import task_pb2

from tests.integration.conftest import Database, Recorded, opened
from tests.integration.store_requests import image_request, tts_request

if TYPE_CHECKING:
    from tests.conftest import NatsServer

DAY = 86_400.0


@pytest.fixture
async def media(nats_server: NatsServer) -> AsyncIterator[MediaStore]:
    nc = await nats.connect(nats_server.url)
    try:
        yield MediaStore(await natsconn.ensure_media_bucket(nc.jetstream(), Topology()))
    finally:
        await nc.close()


async def finished_with_media(rec: Recorded, media: MediaStore, tts: bool = False) -> task_pb2.Task:
    """A task completed with a media object of its own in the bucket."""
    task, _ = await rec.store.create("t1", tts_request() if tts else image_request())
    await rec.store.claim(task.id, 1, "w")
    key = f"{task.id}.{'wav' if tts else 'png'}"
    await media.put(key, b"bytes of " + key.encode())
    request = spb.CompleteTaskRequest(task_id=task.id, attempt=1)
    if tts:
        request.tts_result.audio_url = f"charai-media:{key}"
    else:
        request.image_result.image_url = f"charai-media:{key}"
    return await rec.store.complete(request)


async def test_remove_task_deletes_media_then_the_task(db: Database, media: MediaStore) -> None:
    async with opened(db) as rec:
        done = await finished_with_media(rec, media)
        running, _ = await rec.store.create("t1", image_request())
        await rec.store.claim(running.id, 1, "w")
        with pytest.raises(TaskNotFinishedError):
            await remove_task(rec.store, media, "t1", running.id)
        with pytest.raises(NotFoundError):
            await remove_task(rec.store, media, "t2", done.id)
        assert await media.get(f"{done.id}.png") is not None  # nothing removed by a refusal
        assert await remove_task(rec.store, media, "t1", done.id)
        assert await media.get(f"{done.id}.png") is None
        with pytest.raises(NotFoundError):
            await rec.store.get("t1", done.id)
        with pytest.raises(NotFoundError):
            await remove_task(rec.store, media, "t1", done.id)


async def test_retention_deletes_ended_tasks_and_their_media_after_the_configured_days(
    db: Database, media: MediaStore
) -> None:
    async with opened(db) as rec:
        clock = rec.clock
        old_image = await finished_with_media(rec, media)
        old_cancelled, _ = await rec.store.create("t1", image_request())
        await rec.store.cancel("t1", old_cancelled.id)
        running, _ = await rec.store.create("t1", image_request())
        await rec.store.claim(running.id, 1, "w")
        sweeper = RetentionSweeper(rec.store, media, days=7, clock=clock, batch=1)

        clock.advance(7 * DAY - 60)
        assert await sweeper.sweep_once() == 0  # not old enough yet
        recent = await finished_with_media(rec, media, tts=True)
        clock.advance(120)
        assert await sweeper.sweep_once() == 2  # in batches of one: the loop takes them all
        for gone in (old_image, old_cancelled):
            with pytest.raises(NotFoundError):
                await rec.store.get("t1", gone.id)
        assert await media.get(f"{old_image.id}.png") is None
        assert await media.get(f"{recent.id}.wav") == f"bytes of {recent.id}.wav".encode()
        assert (await rec.store.get("t1", running.id)).status == task_pb2.TASK_STATUS_RUNNING
        assert (await rec.store.get("t1", recent.id)).status == task_pb2.TASK_STATUS_COMPLETED
        clock.advance(7 * DAY)
        assert await sweeper.sweep_once() == 1
        assert await media.get(f"{recent.id}.wav") is None
        assert sweeper.deleted == 3
        assert (await rec.store.get("t1", running.id)).status == task_pb2.TASK_STATUS_RUNNING  # never


async def test_retention_off_starts_no_sweeper(db: Database) -> None:
    async with opened(db) as rec:
        sweeper = RetentionSweeper(rec.store, None, days=0, clock=rec.clock)
        sweeper.start()
        try:
            assert sweeper._task is None
        finally:
            await sweeper.close()
