"""Estimated start and end times: the arithmetic (pure) and the book task_store keeps."""

from __future__ import annotations

import pytest
from charai.core.domain.eta import MeanDuration, StartRate, end_estimate, start_estimate
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.eta import EtaBook
from charai.tasks.v1 import task_pb2
from hypothesis import given
from hypothesis import strategies as st


def test_steady_starts_give_their_rate() -> None:
    rate = StartRate()
    for i in range(600):  # 2 per second for 5 minutes
        rate.observe(1000.0 + i * 0.5)
    assert rate.rate(1300.0) == pytest.approx(2.0, rel=0.05)


def test_a_lane_busy_again_after_a_lull_shows_its_new_rate_at_once() -> None:
    rate = StartRate()
    for i in range(200):  # 1 per second
        rate.observe(float(i))
    for i in range(40):  # idle for 10 minutes, then 10 per second for 4 s
        rate.observe(800.0 + i * 0.1)
    assert rate.rate(804.0) == pytest.approx(10.0, rel=0.05)


def test_an_idle_lane_rate_falls_then_is_unknown() -> None:
    rate = StartRate(window=120.0)
    for i in range(60):
        rate.observe(i * 0.5)  # 2 per second for 30 s
    assert rate.rate(30.0) == pytest.approx(2.0, rel=0.05)
    assert rate.rate(60.0) == pytest.approx(1.0, rel=0.05)  # the same starts over twice the time
    assert rate.rate(500.0) == 0.0
    assert StartRate().rate(5.0) == 0.0


def test_a_burst_at_one_instant_is_not_an_endless_rate() -> None:
    rate = StartRate()
    rate.observe(10.0, count=8)
    assert rate.rate(10.0) == 8.0


def test_start_is_position_over_rate_and_never_before_a_retry_time() -> None:
    assert start_estimate(100.0, 10, 2.0) == 105.0
    assert start_estimate(100.0, 10, 2.0, not_before=200.0) == 200.0
    assert start_estimate(100.0, 0, 2.0) is None
    assert start_estimate(100.0, 3, 0.0) is None


def test_mean_duration_moves_toward_new_runs() -> None:
    mean = MeanDuration(alpha=0.5)
    mean.observe(10.0)
    mean.observe(20.0)
    assert mean.value == 15.0


def test_end_from_mean_then_from_progress_when_late() -> None:
    assert end_estimate(now=102.0, started=100.0, progress=10, mean=10.0) == 110.0
    # Late and without telling progress: a little after now, not in the past.
    late = end_estimate(now=130.0, started=100.0, progress=10, mean=10.0)
    assert late is not None and late > 130.0
    # Late, half-way by progress after 30 s: about 30 s more.
    assert end_estimate(now=130.0, started=100.0, progress=55, mean=10.0) == pytest.approx(160.0)
    assert end_estimate(now=130.0, started=100.0, progress=10, mean=None) is None


@given(
    now=st.floats(0, 1e6),
    elapsed=st.floats(0, 1e4),
    progress=st.integers(0, 100),
    mean=st.none() | st.floats(0, 1e4),
)
def test_an_end_estimate_is_never_in_the_past(
    now: float, elapsed: float, progress: int, mean: float | None
) -> None:
    end = end_estimate(now, now - elapsed, progress, mean)
    assert end is None or end >= now - 1e-6


def _event(kind: int, task: task_pb2.Task, at_us: int) -> spb.EventEnvelope:
    envelope = spb.EventEnvelope(tenant="t")
    envelope.event.type = kind  # type: ignore[assignment]
    envelope.event.time.FromMicroseconds(at_us)
    envelope.event.task.CopyFrom(task)
    return envelope


def test_book_fills_queued_and_running_tasks_from_committed_events() -> None:
    book = EtaBook()
    image = task_pb2.TASK_TYPE_IMAGE_GENERATION
    started = []
    for i in range(120):  # one image start per second, each running 4 s
        task = task_pb2.Task(id=f"t{i}", type=image, status=task_pb2.TASK_STATUS_RUNNING)
        task.start_time.FromSeconds(1000 + i)
        started.append(_event(task_pb2.TASK_EVENT_TYPE_STARTED, task, (1000 + i) * 1_000_000))
        done = task_pb2.Task()
        done.CopyFrom(task)
        done.end_time.FromSeconds(1004 + i)
        started.append(_event(task_pb2.TASK_EVENT_TYPE_COMPLETED, done, (1004 + i) * 1_000_000))
    book.observe(started)

    queued = task_pb2.Task(type=image, status=task_pb2.TASK_STATUS_QUEUED, queue_position=30)
    book.fill(queued, 1120.0)
    assert queued.estimated_start_time.ToSeconds() == pytest.approx(1150, abs=3)
    assert not queued.HasField("estimated_end_time")

    other = task_pb2.Task(type=task_pb2.TASK_TYPE_TTS_GENERATION, status=task_pb2.TASK_STATUS_QUEUED)
    other.queue_position = 5
    book.fill(other, 1124.0)
    assert not other.HasField("estimated_start_time")  # no TTS start seen: no rate to go by

    running = task_pb2.Task(type=image, status=task_pb2.TASK_STATUS_RUNNING, progress=10)
    running.start_time.FromSeconds(1123)
    book.fill(running, 1124.0)
    assert running.estimated_end_time.ToSeconds() == 1127

    running.status = task_pb2.TASK_STATUS_COMPLETED
    book.fill(running, 1130.0)
    assert not running.HasField("estimated_end_time")


def test_a_scheduled_retry_starts_no_earlier_than_its_time() -> None:
    book = EtaBook()
    task = task_pb2.Task(type=task_pb2.TASK_TYPE_IMAGE_GENERATION, status=task_pb2.TASK_STATUS_QUEUED)
    task.next_attempt_time.FromSeconds(2000)
    book.fill(task, 1990.0)
    assert task.estimated_start_time.ToSeconds() == 2000


def test_cli_says_when_a_task_should_start_or_end() -> None:
    from charai.client.cli.text import eta_text

    queued = task_pb2.Task(status=task_pb2.TASK_STATUS_QUEUED)
    assert eta_text(queued, now=100.0) == ""
    queued.estimated_start_time.FromSeconds(142)
    assert eta_text(queued, now=100.0) == "(starts in ~42 s)"
    queued.estimated_start_time.FromSeconds(400)
    assert eta_text(queued, now=100.0) == "(starts in ~5 min)"
    running = task_pb2.Task(status=task_pb2.TASK_STATUS_RUNNING)
    running.estimated_end_time.FromSeconds(100)
    assert eta_text(running, now=100.0) == "(ends any moment)"
