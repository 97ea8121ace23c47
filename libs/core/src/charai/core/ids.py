"""Server-made identifiers: UUIDv7 (RFC 9562), time-ordered, written as 32 hex digits.

Why time-ordered: every table and index keyed by a task id (the task row, its metadata, events,
backlog and outbox rows) then grows at its end instead of at a random page. With random UUIDv4
ids each create dirtied a random leaf of each of those B-trees (``BENCHMARKS.md``, "Data plane
v2", has the before and after). 74 of the 128 bits stay random (``secrets``), so ids remain
unguessable; they reveal their creation time to the millisecond, which every task carries in
``create_time`` anyway.

Pure: the caller passes the time (task_store's clock), so tests can fix it.
"""

from __future__ import annotations

import secrets

_RANDOM_BITS = 74


def uuid7_hex(unix_us: int, random_bits: int | None = None) -> str:
    """A UUIDv7 as 32 lowercase hex digits: 48 bits of Unix milliseconds, the version (7), 12
    random bits, the variant (0b10) and 62 more random bits. ``random_bits`` (tests) replaces the
    74 random bits."""
    if unix_us < 0:
        raise ValueError("unix_us must not be negative")
    rand = secrets.randbits(_RANDOM_BITS) if random_bits is None else random_bits & ((1 << _RANDOM_BITS) - 1)
    value = ((unix_us // 1000) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 62) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    return f"{value:032x}"


def new_task_id(unix_us: int) -> str:
    """``task_`` + a UUIDv7 of ``unix_us`` (the form ``validation`` and media keys accept)."""
    return f"task_{uuid7_hex(unix_us)}"
