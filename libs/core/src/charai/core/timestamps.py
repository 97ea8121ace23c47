"""``google.protobuf.Timestamp`` to and from whole microseconds, for the store's hot paths.

protobuf's own ``ToMicroseconds`` and ``FromMicroseconds`` are Python methods that check the
timestamp's range on every call (a function call and four comparisons), which task_store paid
about twenty times per task: on the times it stamps itself from its clock, and on the times it
wrote itself and reads back. These do the same arithmetic without the check. Anything from
outside (a client's request) is validated where it enters, not here.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

_MICROS_PER_SECOND = 1_000_000
_NANOS_PER_MICRO = 1_000


def micros(ts: Timestamp) -> int:
    """``ts.ToMicroseconds()``: whole microseconds since the epoch (sub-microsecond nanos
    dropped, towards the past, as protobuf does)."""
    return ts.seconds * _MICROS_PER_SECOND + ts.nanos // _NANOS_PER_MICRO


def set_micros(ts: Timestamp, value: int) -> None:
    """``ts.FromMicroseconds(value)``: ``seconds`` floored, ``nanos`` in [0, 1e9)."""
    seconds, rest = divmod(value, _MICROS_PER_SECOND)
    ts.seconds = seconds
    ts.nanos = rest * _NANOS_PER_MICRO
