"""Server-made identifiers: UUIDv7 (RFC 9562), time-ordered, written as 32 hex digits.

Why time-ordered: every table and index keyed by a task id (the task row, its metadata, events,
backlog and outbox rows) then grows at its end instead of at a random page. With random UUIDv4
ids each create dirtied a random leaf of each of those B-trees (``BENCHMARKS.md``, "Data plane
v2", has the before and after). 74 of the 128 bits stay random (the OS's CSPRNG), so ids remain
unguessable; they reveal their creation time to the millisecond, which every task carries in
``create_time`` anyway.

Pure: the caller passes the time (task_store's clock), so tests can fix it.
"""

from __future__ import annotations

import os
import threading

_RANDOM_BITS = 74
#: Random bytes read from the OS at once, per thread: one ``getrandom`` call per 409 ids instead
#: of one per id (a system call releases the GIL, and task_store's database thread, which makes
#: the ids, shares it with the event loop).
_POOL_BYTES = 4096
_ID_BYTES = 10
_local = threading.local()


def _random_74() -> int:
    """74 bits from the OS's CSPRNG, through a per-thread pool (never reused: each id takes
    bytes nobody else took)."""
    pool: bytes | None = getattr(_local, "pool", None)
    at: int = getattr(_local, "at", 0)
    if pool is None or at + _ID_BYTES > len(pool):
        pool, at = os.urandom(_POOL_BYTES), 0
        _local.pool = pool
    _local.at = at + _ID_BYTES
    return int.from_bytes(pool[at : at + _ID_BYTES]) >> (8 * _ID_BYTES - _RANDOM_BITS)


def uuid7_hex(unix_us: int, random_bits: int | None = None) -> str:
    """A UUIDv7 as 32 lowercase hex digits: 48 bits of Unix milliseconds, the version (7), 12
    random bits, the variant (0b10) and 62 more random bits. ``random_bits`` (tests) replaces the
    74 random bits."""
    if unix_us < 0:
        raise ValueError("unix_us must not be negative")
    rand = _random_74() if random_bits is None else random_bits & ((1 << _RANDOM_BITS) - 1)
    value = ((unix_us // 1000) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 62) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    return f"{value:032x}"


def new_task_id(unix_us: int) -> str:
    """``task_`` + a UUIDv7 of ``unix_us`` (the form ``validation`` and media keys accept)."""
    return f"task_{uuid7_hex(unix_us)}"
