"""Estimated times through the real store (both backends): a queued task's start follows its
place in the queue and the lane's measured start rate; a running task's end follows the lane's
run time; every event and read carries the current estimate. Time is the store's ManualClock."""

from __future__ import annotations

import pytest
from charai.tasks.v1 import task_pb2

from tests.integration.conftest import Recorded
from tests.integration.store_requests import EV, RUN, complete_req, image_request, tts_request


async def test_queued_and_running_tasks_carry_estimates(rec: Recorded) -> None:
    store, clock = rec.store, rec.clock
    tasks = [(await store.create("t1", image_request(f"c{i}")))[0] for i in range(12)]
    tts, _ = await store.create("t1", tts_request())
    fresh = await store.get("t1", tasks[-1].id)
    assert fresh.queue_position == 12
    assert not fresh.HasField("estimated_start_time")  # no start seen yet: nothing to go by

    # A steady lane: one start every 2 s, each run 4 s (two at a time).
    running: list[tuple[str, int]] = []
    for task in tasks[:6]:
        claim = await store.claim(task.id, 1, "w")
        assert claim.outcome == RUN and claim.task is not None
        running.append((task.id, claim.task.attempt))
        if len(running) > 2:
            done_id, attempt = running.pop(0)
            await store.complete(complete_req(done_id, attempt))
        clock.advance(2.0)

    waiting = await store.get("t1", tasks[-1].id)
    assert waiting.queue_position == 6
    wait = waiting.estimated_start_time.ToMicroseconds() / 1e6 - clock.time()
    assert wait == pytest.approx(6 * 2.0, rel=0.3)  # 6 places at about 0.5 starts per second
    tts_task = await store.get("t1", tts.id)
    assert tts_task.queue_position == 1 and not tts_task.HasField("estimated_start_time")  # other lane

    # The newest running task's events carry its expected end: start + the lane's run time.
    last_id = running[-1][0]
    started = next(e for e in await rec.events(last_id) if e.type == EV.TASK_EVENT_TYPE_STARTED)
    assert started.task.status == task_pb2.TASK_STATUS_RUNNING
    run_time = started.task.estimated_end_time.ToMicroseconds() - started.task.start_time.ToMicroseconds()
    assert run_time / 1e6 == pytest.approx(4.0, rel=0.3)
    await store.progress(last_id, running[-1][1], 55, "generating")
    progress = (await rec.events(last_id))[-1]
    assert progress.type == EV.TASK_EVENT_TYPE_PROGRESS and progress.task.HasField("estimated_end_time")
    ended = await store.complete(complete_req(last_id, running[-1][1]))
    assert not ended.HasField("estimated_end_time") and not ended.HasField("estimated_start_time")
