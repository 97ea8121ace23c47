"""Pure tests of the retry policy (charai.core.domain.retry)."""

from __future__ import annotations

import random

import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from hypothesis import given
from hypothesis import strategies as st

#: Retries after the first attempt, per DESIGN.md section 4 (5xx/timeouts: at most 3; bad responses:
#: once or twice; the non-retryable kinds fail at once).
EXPECTED_RETRIES = {
    ErrorKind.PROVIDER_AUTH: 0,
    ErrorKind.CONTENT_REJECTED: 0,
    ErrorKind.INVALID_REQUEST: 0,
    ErrorKind.QUOTA_EXHAUSTED: 0,
    ErrorKind.RATE_LIMITED: 5,
    ErrorKind.PROVIDER_UNAVAILABLE: 3,
    ErrorKind.PROVIDER_TIMEOUT: 3,
    ErrorKind.PROVIDER_BAD_RESPONSE: 2,
    ErrorKind.WORKER_LOST: 2,
    ErrorKind.INTERNAL: 1,
}

EPS = 1e-9

policies = st.builds(
    RetryPolicy,
    base=st.floats(0.01, 10.0),
    cap=st.floats(0.05, 300.0),
    max_attempts=st.integers(1, 12),
)
kinds = st.sampled_from(list(ErrorKind))


def step_of(policy: RetryPolicy, attempt: int) -> float:
    factor: int = 2 ** max(0, attempt - 1)  # int ** int is Any to mypy (a negative exponent gives a float)
    return min(policy.cap, policy.base * factor)


def run_until_failure(policy: RetryPolicy, kind: ErrorKind, rng: random.Random) -> int:
    """Attempts made in all when every attempt fails with ``kind``."""
    attempt = 1
    while policy.decide(kind, attempt, rng=rng) is not None:
        attempt += 1
        assert attempt <= 100, "decide never gives up"
    return attempt


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.base, policy.cap, policy.max_attempts) == (1.0, 60.0, 6)


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.name)
def test_retry_limits_per_kind(kind: ErrorKind) -> None:
    assert kind.max_retries == EXPECTED_RETRIES[kind]
    assert kind.retryable is (EXPECTED_RETRIES[kind] > 0)


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.name)
def test_total_attempts_with_default_policy(kind: ErrorKind) -> None:
    policy = RetryPolicy()
    total = run_until_failure(policy, kind, random.Random(1))
    assert total == min(1 + EXPECTED_RETRIES[kind], policy.max_attempts)


@given(policies, kinds, st.randoms(use_true_random=False))
def test_total_attempts_is_one_plus_retries_capped_by_max_attempts(
    policy: RetryPolicy, kind: ErrorKind, rng: random.Random
) -> None:
    total = run_until_failure(policy, kind, rng)
    assert total == max(1, min(1 + kind.max_retries, policy.max_attempts))


@given(policies, kinds, st.integers(1, 20), st.none() | st.floats(0, 1000), st.randoms(use_true_random=False))
def test_decide_is_none_exactly_when_the_task_must_fail(
    policy: RetryPolicy, kind: ErrorKind, attempt: int, retry_after: float | None, rng: random.Random
) -> None:
    result = policy.decide(kind, attempt, retry_after, rng)
    must_fail = not kind.retryable or attempt - 1 >= kind.max_retries or attempt >= policy.max_attempts
    assert (result is None) is must_fail
    if result is not None:
        assert result >= 0


@given(policies, st.integers(1, 60), st.randoms(use_true_random=False))
def test_delay_without_retry_after_is_equal_jitter_within_cap(
    policy: RetryPolicy, attempt: int, rng: random.Random
) -> None:
    step = step_of(policy, attempt)
    delay = policy.delay(attempt, None, rng)
    assert step / 2 - EPS <= delay <= step + EPS
    assert delay <= policy.cap + EPS


@given(policies, st.integers(1, 60), st.floats(0.001, 1000), st.randoms(use_true_random=False))
def test_delay_honours_retry_after_as_floor(
    policy: RetryPolicy, attempt: int, retry_after: float, rng: random.Random
) -> None:
    delay = policy.delay(attempt, retry_after, rng)
    assert delay >= retry_after - EPS
    assert delay >= min(step_of(policy, attempt) / 2, policy.cap) - EPS
    assert delay <= max(policy.cap, 1.5 * retry_after) + EPS
    # The cap bounds our own backoff, not the provider's word: above it only the jitter remains.
    assert delay <= max(step_of(policy, attempt), 1.5 * retry_after) + EPS


@given(policies, st.integers(1, 30), st.sampled_from([0.0, -1.0, -1e9]), st.randoms(use_true_random=False))
def test_non_positive_retry_after_is_ignored(
    policy: RetryPolicy, attempt: int, retry_after: float, rng: random.Random
) -> None:
    seed = rng.random()
    with_value = policy.delay(attempt, retry_after, random.Random(seed))
    without = policy.delay(attempt, None, random.Random(seed))
    assert with_value == without


def test_delay_grows_exponentially_until_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0)
    for attempt, step in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 32), (7, 60), (20, 60)]:
        delays = [policy.delay(attempt, rng=random.Random(seed)) for seed in range(50)]
        assert all(step / 2 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > step / 10, "jitter should spread the delays"


def test_retry_after_longer_than_cap_is_waited_in_full() -> None:
    policy = RetryPolicy(base=1.0, cap=10.0)
    delays = [policy.delay(1, 120.0, random.Random(seed)) for seed in range(20)]
    assert all(120.0 <= d <= 180.0 for d in delays)
    assert max(delays) - min(delays) > 5, "even a long Retry-After is jittered so the herd spreads"


def test_retry_after_is_jittered_upwards_to_avoid_a_retry_storm() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0)
    delays = {policy.delay(1, 10.0, random.Random(seed)) for seed in range(20)}
    assert len(delays) > 10
    assert all(10.0 <= d <= 15.0 for d in delays)


def test_decide_is_deterministic_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    a = policy.decide(ErrorKind.RATE_LIMITED, 2, 3.0, random.Random(42))
    b = policy.decide(ErrorKind.RATE_LIMITED, 2, 3.0, random.Random(42))
    assert a == b
    assert a is not None


def test_decide_passes_retry_after_through() -> None:
    policy = RetryPolicy(base=0.1, cap=60.0)
    delay = policy.decide(ErrorKind.RATE_LIMITED, 1, 30.0, random.Random(3))
    assert delay is not None
    assert 30.0 <= delay <= 45.0


def test_delay_for_a_very_late_attempt_is_the_cap() -> None:
    """``delay`` is public and documented to never exceed ``cap``; a large attempt number must not crash.

    Regression: ``base * (2 ** (attempt - 1))`` raised OverflowError once attempt > ~1024.
    """
    policy = RetryPolicy(base=1.0, cap=60.0)
    try:
        delay = policy.delay(2000, rng=random.Random(0))
    except OverflowError as exc:
        pytest.fail(f"RetryPolicy.delay(2000) raised OverflowError ({exc}) instead of returning <= cap")
    assert 30.0 <= delay <= 60.0


@given(policies, st.integers(1, 100_000), st.randoms(use_true_random=False))
def test_delay_never_overflows(policy: RetryPolicy, attempt: int, rng: random.Random) -> None:
    delay = policy.delay(attempt, None, rng)
    assert 0 < delay <= policy.cap + EPS
    if attempt >= 64:  # the exponential step is long past the cap
        assert delay >= policy.cap / 2 - EPS
