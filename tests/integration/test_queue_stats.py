"""The queue statistics (GetQueueStats, the queue gauges) on both backends, and where SQLite runs
them: beside the write path (``Backend.read_aside``), so a long read holds up no write."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from charai.core.domain.errors import ErrorKind
from charai.task_store.backend import Tx
from charai.task_store.sqlite_backend import SqliteBackend
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.integration.conftest import Recorded, opened, sqlite_database
from tests.integration.store_requests import (
    IMAGE,
    RUN,
    TTS,
    complete_req,
    fail_req,
    image_request,
    tts_request,
)

NORMAL = task_pb2.PRIORITY_NORMAL


def lane(
    lanes: list[task_service_pb2.LaneStats], kind: int, priority: int = NORMAL
) -> task_service_pb2.LaneStats:
    [found] = [x for x in lanes if x.type == kind and x.priority == priority]
    return found


async def test_median_wait_is_the_middle_first_start_of_each_lane(rec: Recorded) -> None:
    """Creation to first start, per lane: the middle sample of an odd count, the mean of the two
    middle ones of an even count; a retried attempt's start is not a sample."""
    store, clock = rec.store, rec.clock
    made = [(await store.create("t1", tts_request(f"char_{i}")))[0] for i in range(5)]
    await store.create("t1", image_request())
    for task, after in zip(made[:4], (1.0, 2.0, 3.0, 10.0), strict=True):
        clock.advance(after - (clock.now_us() - task.create_time.ToMicroseconds()) / 1e6)
        claim = await store.claim(task.id, 1, "w")
        assert claim.outcome == RUN
    lanes, backlog = await store.queue_stats()
    tts = lane(lanes, TTS)
    assert tts.wait_samples == 4
    assert tts.median_wait_seconds == pytest.approx(2.5, abs=1e-3)  # (2 + 3) / 2
    assert (tts.depth, tts.in_flight, tts.completed_last_minute) == (1, 4, 0)
    assert lane(lanes, IMAGE).wait_samples == 0 and lane(lanes, IMAGE).depth == 1
    assert backlog == await rec.store.backend.read(lambda tx: tx.fetchval("SELECT COUNT(*) FROM outbox"))

    # The fifth task's first start: an odd count, its middle sample.
    await store.claim(made[4].id, 1, "w")
    # The first task fails, is retried and starts again: still one sample of its wait.
    await store.fail(fail_req(made[0].id, 1, ErrorKind.PROVIDER_UNAVAILABLE))
    clock.advance(1.0)
    again = await store.claim(made[0].id, 2, "w")
    assert again.outcome == RUN and again.attempt == 2
    await store.complete(complete_req(made[1].id, 1))
    lanes, _ = await store.queue_stats()
    tts = lane(lanes, TTS)
    waits = sorted([1.0, 2.0, 3.0, 10.0, (clock.now_us() - made[4].create_time.ToMicroseconds()) / 1e6 - 1.0])
    assert tts.wait_samples == 5
    assert tts.median_wait_seconds == pytest.approx(waits[2], abs=1e-3)
    assert (tts.in_flight, tts.completed_last_minute) == (4, 1)


async def test_queue_gauges_read_the_lanes_counts_alone(rec: Recorded) -> None:
    """The gauges' read (every few seconds while metrics are served) has the depths, retry waits,
    in-flight counts and backlog of the full statistics, and none of their scans of history."""
    store = rec.store
    tasks = [(await store.create("t1", tts_request(f"char_{i}")))[0] for i in range(3)]
    await store.claim(tasks[0].id, 1, "w")
    await store.claim(tasks[1].id, 1, "w")
    await store.complete(complete_req(tasks[1].id, 1))
    full, full_backlog = await store.queue_stats()
    gauges, backlog = await store.queue_gauges()
    assert backlog == full_backlog
    for stats, counts in zip(full, gauges, strict=True):
        assert (stats.type, stats.priority) == (counts.type, counts.priority)
        assert (stats.depth, stats.waiting_retry, stats.in_flight) == (
            counts.depth,
            counts.waiting_retry,
            counts.in_flight,
        )
        assert (counts.completed_last_minute, counts.wait_samples, counts.median_wait_seconds) == (0, 0, 0)
    tts = lane(gauges, TTS)
    assert (tts.depth, tts.in_flight) == (1, 1)
    assert lane(full, TTS).completed_last_minute == 1


async def test_sqlite_a_long_read_holds_up_no_write_and_reads_one_snapshot(tmp_path: Path) -> None:
    """A read run beside the write path (the queue statistics, usage reports) that takes long
    (here: held until the test lets it go) lets a create commit meanwhile, and sees what was
    committed when it began, all through: on the database thread, the create waited for it."""
    async with opened(sqlite_database(tmp_path / "tasks.db")) as rec:
        backend = rec.store.backend
        assert isinstance(backend, SqliteBackend)
        await rec.store.create("t1", tts_request("char_before"))
        inside, go_on = threading.Event(), threading.Event()

        async def long_read(tx: Tx) -> tuple[int, int]:
            before = int(await tx.fetchval("SELECT COUNT(*) FROM tasks"))
            inside.set()
            go_on.wait(60)  # the aside thread's own wait: a long scan
            return before, int(await tx.fetchval("SELECT COUNT(*) FROM tasks"))

        reading = asyncio.create_task(backend.read_aside(long_read))
        try:
            assert await asyncio.to_thread(inside.wait, 60)
            task, created = await asyncio.wait_for(rec.store.create("t1", tts_request("char_during")), 60)
            assert created and not reading.done()
            assert (await rec.store.get("t1", task.id)).id == task.id
        finally:
            go_on.set()
        assert await reading == (1, 1)  # its snapshot: the create during it is not in it
        assert await backend.read_aside(lambda tx: tx.fetchval("SELECT COUNT(*) FROM tasks")) == 2
        with pytest.raises(sqlite3.OperationalError, match="readonly database"):
            await backend.read_aside(lambda tx: tx.execute("DELETE FROM tasks"))
        assert backend.aside.reads == 3
    with pytest.raises(RuntimeError, match="not open"):
        await backend.read_aside(lambda tx: tx.fetchval("SELECT 1"))
