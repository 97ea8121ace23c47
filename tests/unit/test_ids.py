"""Task ids are UUIDv7: time-ordered (B-trees keyed by them grow at their end), still random."""

from __future__ import annotations

import threading
import uuid

import pytest
from charai.core import ids, validation
from hypothesis import given
from hypothesis import strategies as st

_US = st.integers(min_value=0, max_value=(1 << 48) * 1000 - 1)


@given(_US, st.integers(min_value=0, max_value=(1 << 74) - 1))
def test_a_uuid7_carries_its_millisecond_version_and_variant(unix_us: int, rand: int) -> None:
    text = ids.uuid7_hex(unix_us, rand)
    parsed = uuid.UUID(hex=text)
    assert len(text) == 32 and text == text.lower()
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == unix_us // 1000
    # Every random bit lands in the id, and only there.
    assert ((parsed.int >> 64) & 0xFFF) << 62 | (parsed.int & ((1 << 62) - 1)) == rand


_RAND = st.integers(min_value=0, max_value=(1 << 74) - 1)


@given(_US, _US, _RAND, _RAND)
def test_ids_of_different_milliseconds_sort_by_time(a: int, b: int, ra: int, rb: int) -> None:
    if a // 1000 < b // 1000:
        assert ids.uuid7_hex(a, ra) < ids.uuid7_hex(b, rb)


def test_task_ids_are_valid_task_ids_and_differ_within_one_microsecond() -> None:
    made = {ids.new_task_id(1_764_900_000_000_000) for _ in range(1000)}
    assert len(made) == 1000
    for task_id in made:
        validation.validate_task_id("id", task_id)
        assert task_id.startswith("task_019")  # December 2025 in Unix milliseconds


def test_negative_time_is_refused() -> None:
    with pytest.raises(ValueError, match="unix_us"):
        ids.uuid7_hex(-1)


def test_validation_still_refuses_what_is_not_a_task_id() -> None:
    with pytest.raises(validation.RequestInvalidError):
        validation.validate_task_id("id", "task_" + "g" * 32)


def test_threads_draw_from_their_own_random_pools() -> None:
    made: list[str] = []

    def draw() -> None:
        made.extend(ids.new_task_id(1_764_900_000_000_000) for _ in range(2000))

    threads = [threading.Thread(target=draw) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 6000
