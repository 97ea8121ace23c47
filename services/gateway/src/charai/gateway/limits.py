"""Per-tenant submission rate limit (a token bucket) and the error every gateway limit raises.

Why in the gateway servicer, not in the HTTP routes: gRPC-web and REST are bridged to the gRPC
port, so CreateTask is the one door every submission passes, whatever the transport. Why before
validation: a flood of invalid requests costs the gateway as much as valid ones.

Why a token bucket: a client may submit a character's batch (front, side, back, costumes,
voices) at once — ``burst`` — while a runaway loop is held to ``rate`` per second and learns from
the answer when to come back (``RetryInfo``, and ``Retry-After`` on REST).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from charai.core.errors import LimitExceededError
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2


class QuotaExceededError(LimitExceededError):
    """RESOURCE_EXHAUSTED naming the limit: ``ErrorInfo`` (reason ``LIMIT_EXCEEDED``, metadata
    ``limit`` = the setting's name in lower case), ``QuotaFailure`` (subject and description) and,
    when waiting helps, ``RetryInfo``."""

    def __init__(self, message: str, *, limit: str, subject: str, retry_after: float | None = None) -> None:
        metadata = {"limit": limit}
        if retry_after is not None:
            metadata["retry_after_seconds"] = f"{retry_after:.3f}"
        super().__init__(message, **metadata)
        self.limit = limit
        self.retry_after = retry_after
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
        )
        self.extra_details: list[Message] = [quota]
        if retry_after is not None:
            seconds = max(retry_after, 0.001)
            delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds - int(seconds)) * 1e9))
            self.extra_details.append(error_details_pb2.RetryInfo(retry_delay=delay))


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class SubmitLimiter:
    """One token bucket per tenant: ``burst`` tokens, refilled at ``rate`` per second; each
    CreateTask takes one. ``rate == 0`` turns the limit off.

    Memory stays bounded: tenants come from the configured tokens, and buckets that have
    refilled completely (indistinguishable from a new one) are dropped when the table grows.
    """

    #: Above this many buckets, full ones are pruned.
    PRUNE_ABOVE = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, tenant: str, count: int = 1) -> None:
        """Takes ``count`` tokens of ``tenant``'s bucket (all or none; a batch of creates) or
        raises :class:`QuotaExceededError`."""
        if not self.enabled:
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self.PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[tenant] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= count:
            bucket.tokens -= count
            return
        wait = (count - bucket.tokens) / self.rate
        raise QuotaExceededError(
            f"too many tasks submitted: at most {_number(self.rate)} per second per tenant, "
            f"{self.burst} at once (CHARAI_SUBMIT_RATE_PER_TENANT, CHARAI_SUBMIT_BURST_PER_TENANT); "
            f"retry in {math.ceil(wait * 1000) / 1000:g} s",
            limit="submit_rate_per_tenant",
            subject=f"tenant:{tenant}",
            retry_after=wait,
        )

    def _prune(self, now: float) -> None:
        full = [
            tenant
            for tenant, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.burst
        ]
        for tenant in full:
            del self._buckets[tenant]


def _number(value: float) -> str:
    return f"{value:g}"
