"""W3C trace context (``traceparent``), the propagation format of OpenTelemetry.

A trace starts at the client call (or at the gateway, if the client sent none), and follows the
task through task_store (gRPC metadata), the job's JetStream message (a header, and the Job) and
the worker to the provider call (an HTTP header): every hop continues the same trace id with a
span id of its own, and every log line carries ``trace_id``. No exporter runs (none is installed);
a collector-side OpenTelemetry deployment can join the spans by these ids.

Ids come from ``random`` (seeded from the OS at start), not ``secrets``: they are correlation
ids, not secrets, and ``os.urandom`` is a system call that releases the GIL, so in task_store,
whose database thread shares the GIL with the event loop, each call could wait out the other
thread's turn (py-spy put 8 % of task_store's event-loop samples under B4 there).
"""

from __future__ import annotations

import contextvars
import random
import re

current: contextvars.ContextVar[str] = contextvars.ContextVar("traceparent", default="")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32


def valid(traceparent: str) -> bool:
    match = _TRACEPARENT.fullmatch(traceparent or "")
    return bool(match) and match.group(1) != _ZERO_TRACE and match.group(2) != "0" * 16  # type: ignore[union-attr]


def new() -> str:
    """A fresh trace (sampled)."""
    return f"00-{random.getrandbits(128) or 1:032x}-{_span_id()}-01"


def child(traceparent: str) -> str:
    """The same trace with a new span id (this hop); a fresh trace if the input is not valid."""
    if not valid(traceparent):
        return new()
    _, trace_id, _, flags = traceparent.split("-")
    return f"00-{trace_id}-{_span_id()}-{flags}"


def _span_id() -> str:
    """16 hex digits, never all zero (W3C: an invalid span id)."""
    return f"{random.getrandbits(64) or 1:016x}"


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1] if valid(traceparent) else ""


def enter(incoming: str) -> str:
    """Continues ``incoming`` (or starts a trace) for the current context; returns the new value."""
    value = child(incoming)
    current.set(value)
    return value
