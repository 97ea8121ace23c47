"""charai.core.timestamps against protobuf's own Timestamp conversions."""

from __future__ import annotations

from charai.core.timestamps import micros, set_micros
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

# Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_US = -62_135_596_800 * 1_000_000
_MAX_US = 253_402_300_799 * 1_000_000 + 999_999


@given(st.integers(_MIN_US, _MAX_US))
def test_set_micros_writes_what_from_microseconds_writes(value: int) -> None:
    ours, theirs = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    set_micros(ours, value)
    theirs.FromMicroseconds(value)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert 0 <= ours.nanos < 1_000_000_000


@given(st.integers(_MIN_US // 1_000_000, _MAX_US // 1_000_000), st.integers(0, 999_999_999))
def test_micros_reads_what_to_microseconds_reads(seconds: int, nanos: int) -> None:
    ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert micros(ts) == ts.ToMicroseconds()


def test_the_round_trip_keeps_every_microsecond_either_side_of_the_epoch() -> None:
    for value in (-1_500_001, -1, 0, 1, 999_999, 1_000_000, 1_765_098_000_123_456):
        ts = timestamp_pb2.Timestamp()
        set_micros(ts, value)
        assert micros(ts) == value
