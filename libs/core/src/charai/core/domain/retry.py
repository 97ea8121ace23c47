"""Retry policy: whether a failed attempt gets another one, and when."""

from __future__ import annotations

import dataclasses
import random

from charai.core.domain.errors import ErrorKind


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring the provider's Retry-After.

    Attributes:
        base: delay before the first retry, in seconds.
        cap: the longest delay.
        max_attempts: attempts in all, whatever the error kind allows.
    """

    base: float = 1.0
    cap: float = 60.0
    max_attempts: int = 6

    def decide(
        self,
        kind: ErrorKind,
        attempt: int,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """Delay before the next attempt, or None when the task must fail now.

        Args:
            kind: the failure's class.
            attempt: 1-based number of the attempt that failed.
            retry_after: the provider's Retry-After, a floor for the delay.
            rng: jitter source (tests pass a seeded one).
        """
        retries_done = attempt - 1
        if not kind.retryable or retries_done >= kind.max_retries or attempt >= self.max_attempts:
            return None
        return self.delay(attempt, retry_after, rng)

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Equal jitter: half the exponential step fixed, half random, so retries spread out.

        A Retry-After is honoured as a floor and jittered upwards by up to 50 %, so many tasks
        told to wait the same time do not come back in the same instant (a retry storm).
        """
        r = rng or random
        step = min(self.cap, self.base * 2.0 ** min(max(0, attempt - 1), 64))
        delay = step / 2 + r.uniform(0, step / 2)
        if retry_after is not None and retry_after > 0:
            # The provider's word beats our cap; the jitter above it still spreads the herd.
            return float(max(delay, retry_after * (1 + r.uniform(0, 0.5))))
        return float(min(delay, self.cap))
