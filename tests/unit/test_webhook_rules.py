"""The webhook delivery rules (charai.core.domain.webhooks), without I/O."""

from __future__ import annotations

import random

import pytest
from charai.core.domain.states import EventType
from charai.core.domain.webhooks import (
    SCHEDULE,
    DeliveryStatus,
    Verdict,
    after_attempt,
    delay_before,
    judge,
    parse_events,
    payload_type,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (0, Verdict.RETRY),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (410, Verdict.GONE),
        (301, Verdict.FINAL),
        (302, Verdict.FINAL),
        (307, Verdict.FINAL),
        (400, Verdict.FINAL),
        (401, Verdict.FINAL),
        (404, Verdict.FINAL),
        (-1, Verdict.FINAL),
        (101, Verdict.FINAL),
    ],
)
def test_every_kind_of_answer_has_its_verdict(status: int, verdict: Verdict) -> None:
    assert judge(status) is verdict


def test_events_default_to_the_terminal_ones_and_unknown_names_are_refused() -> None:
    assert parse_events([]) == {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED}
    assert parse_events(["started", "progress"]) == {EventType.STARTED, EventType.PROGRESS}
    with pytest.raises(ValueError, match="finished"):
        parse_events(["completed", "finished"])
    assert payload_type(EventType.COMPLETED) == "task.completed"


def test_the_default_schedule_is_the_documented_one() -> None:
    assert SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


def test_a_retry_waits_the_jittered_schedule_and_retry_after_is_a_lower_bound() -> None:
    rng = random.Random(7)
    decision = after_attempt(1, 503, None, 0, disable_after=5, rng=rng)
    assert decision.status is DeliveryStatus.PENDING and 4.5 <= (decision.retry_in or 0) <= 5.5
    assert decision.streak == 1 and not decision.disable
    slow = after_attempt(1, 429, 120.0, 0, disable_after=5, rng=rng)
    assert slow.retry_in == 120.0
    capped = after_attempt(1, 429, 10**9, 0, disable_after=5, rng=rng)
    assert capped.retry_in == 36000.0


def test_the_last_attempt_fails_for_good() -> None:
    decision = after_attempt(len(SCHEDULE), 500, None, 0, disable_after=0)
    assert (decision.status, decision.retry_in) == (DeliveryStatus.FAILED, None)


def test_delivery_resets_the_streak_and_410_or_a_long_streak_disables() -> None:
    assert after_attempt(3, 200, None, 9, disable_after=10) == after_attempt(1, 201, None, 0, disable_after=1)
    assert after_attempt(1, 200, None, 9, disable_after=10).streak == 0
    gone = after_attempt(1, 410, None, 0, disable_after=0)
    assert (gone.status, gone.disable) == (DeliveryStatus.FAILED, True)
    tenth = after_attempt(1, 500, None, 9, disable_after=10)
    assert (tenth.status, tenth.disable, tenth.streak) == (DeliveryStatus.FAILED, True, 10)
    assert not after_attempt(1, 500, None, 9, disable_after=0).disable  # 0: streaks never disable


@given(st.integers(1, len(SCHEDULE)), st.integers(0, 2**31))
def test_jitter_stays_within_a_tenth_of_the_schedule(attempt: int, seed: int) -> None:
    delay = delay_before(attempt, SCHEDULE, random.Random(seed))
    base = SCHEDULE[attempt - 1]
    assert delay is not None and base * 0.9 <= delay <= base * 1.1
    assert delay_before(len(SCHEDULE) + 1, SCHEDULE, random.Random(seed)) is None
