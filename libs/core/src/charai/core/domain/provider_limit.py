"""The arithmetic of a provider credential's shared limiter: pure, no I/O, no event loop.

One limiter is shared by every worker process calling the provider with one credential (see
:mod:`charai.core.domain.provider_record` for the record they share). It learns two things
from the provider's 429s, together:

* **the in-flight limit** (AIMD, as the per-process ``ProviderGate`` does): a 429 sets the
  limit to the calls the provider admitted (the calls in flight cluster-wide at that moment,
  minus the refused one); after a limit's worth of successes while the limit binds, it grows by
  one. Growing past the level where the last probe failed is spaced out: each failed probe
  doubles the successes the next one waits for (up to :data:`MAX_SPACING` rounds), so a limit
  sitting at the provider's costs one refused call per sixteen rounds, not one per round.
* **the request rate**, only once a 429 comes *below* the learned level (a rate or quota window,
  or the provider tightening: not a probe of ours): the calls per second admitted lately, scaled
  like the limit. It then follows the limit (scaled by each increase and decrease) and is
  forgotten :data:`RATE_MEMORY` seconds after the last such 429, so one bad minute does not
  cap the worker for good. Such a 429 also pauses every worker for its ``Retry-After``.

A new credential starts *unverified*: one call at a time cluster-wide, until an answer (or a
call still running after :data:`TRIAL_SECONDS`: providers refuse a key before they generate
anything) shows the key is accepted. So a bad key costs one provider call, not one per worker
slot. After that, until the first 429, there is no limit (the workers' own concurrency bounds
the calls), as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

#: At most this many rounds at the limit between two probes above it.
MAX_SPACING = 16
#: Seconds a learned request rate is kept after the 429 that taught it.
RATE_MEMORY = 300.0
#: How long the slots that cannot be split evenly stay with the same workers.
SHARE_ROTATION_SECONDS = 10.0
#: A trial call (unverified credential) still running after this long got past authentication.
TRIAL_SECONDS = 2.0


def trial_window(call_timeout: float) -> float:
    """How long a trial call must run unrefused to verify its credential, for calls that time
    out after ``call_timeout`` seconds: :data:`TRIAL_SECONDS`, or half the call timeout when that
    is shorter. The calls queued behind the trial wait for a slot within their own timeout, so a
    window as long as the timeout would fail them as timeouts, with no provider call, whenever the
    trial call is slow (its own answer or the window, whichever comes first, releases them)."""
    return min(TRIAL_SECONDS, call_timeout / 2)


@dataclasses.dataclass(frozen=True, slots=True)
class Limiter:
    """The shared, learned limits of one credential.

    Attributes:
        limit: calls allowed in flight at once cluster-wide; ``None`` until the first 429.
        good: the highest level proven to be admitted (a full round of successes at it).
        ceiling: the level at which the last probe failed (growing to it is spaced out).
        successes: successes counted towards the next increase.
        spacing: rounds of ``limit`` successes the next increase waits for (1..MAX_SPACING).
        rate: calls per second allowed cluster-wide; ``None``: no rate limit learned.
        rate_until: when ``rate`` is forgotten.
        paused_until: no call starts anywhere before this wall-clock time (a Retry-After).
        verified: whether the provider accepted the credential at least once.
    """

    limit: int | None = None
    good: int | None = None
    ceiling: int | None = None
    successes: int = 0
    spacing: int = 1
    rate: float | None = None
    rate_until: float = 0.0
    paused_until: float = 0.0
    verified: bool = False


def cap(limiter: Limiter) -> int | None:
    """Calls allowed in flight cluster-wide now: 1 while unverified, else the limit."""
    return 1 if not limiter.verified else limiter.limit


def rate_at(limiter: Limiter, now: float) -> float | None:
    """The request rate in force at ``now`` (``None``: none, or forgotten)."""
    return limiter.rate if limiter.rate is not None and now < limiter.rate_until else None


def verified(limiter: Limiter) -> Limiter:
    return limiter if limiter.verified else dataclasses.replace(limiter, verified=True)


def rate_limited(
    limiter: Limiter,
    in_flight: int,
    now: float,
    retry_after: float | None = None,
    admitted_rate: float | None = None,
) -> Limiter:
    """The limiter after a 429.

    Args:
        in_flight: calls in flight cluster-wide when it came, the refused one included.
        now: wall-clock time.
        retry_after: the provider's Retry-After, seconds.
        admitted_rate: calls per second started cluster-wide over a full measuring window
            before the 429 (``None`` when not known: a burst says nothing about a rate, so none
            is learned from it).

    A refusal at the proven level or just below it (within :func:`overshoot`: the other
    refusals of the same overshoot, counted with the workers' slightly stale view of each
    other) is a failed probe of ours: the limit goes back to what was admitted and the next
    probe waits twice as long; nobody pauses. A refusal well below it means the provider admits
    less than it did (a rate or quota window, peak-hour throttling): the limit drops to what was
    admitted, the rate is learned, and every worker pauses for the Retry-After.
    """
    admitted = max(1, in_flight - 1)
    old = limiter.limit
    limit = admitted if old is None else min(old, admitted)
    rate = limiter.rate * limit / old if limiter.rate is not None and old else limiter.rate
    probe = (
        old is not None and limiter.good is not None and admitted >= limiter.good - overshoot(limiter.good)
    )
    if probe:
        return dataclasses.replace(
            limiter,
            limit=limit,
            good=min(limiter.good or limit, limit),
            ceiling=min(limiter.ceiling or admitted + 1, admitted + 1),
            successes=0,
            spacing=min(MAX_SPACING, limiter.spacing * 2),
            rate=rate,
            verified=True,
        )
    rate_until = limiter.rate_until
    if admitted_rate is not None and admitted_rate > 0:
        learned = admitted_rate * admitted / max(1, in_flight)
        rate = learned if rate is None or now >= limiter.rate_until else min(rate, learned)
        rate_until = now + RATE_MEMORY
    paused = limiter.paused_until
    if retry_after is not None and retry_after > 0:
        paused = max(paused, now + retry_after)
    return Limiter(
        limit=limit,
        good=limit if limiter.good is None else min(limiter.good, limit),
        ceiling=None,
        successes=0,
        spacing=1,
        rate=rate,
        rate_until=rate_until,
        paused_until=paused,
        verified=True,
    )


def overshoot(good: int) -> int:
    """How far below the proven level a refusal still counts as our own overshoot (2, or a
    tenth of the level)."""
    return max(2, good // 10)


def succeeded(limiter: Limiter, count: int) -> Limiter:
    """The limiter after ``count`` successes while the limit bound (calls were waiting for a
    slot): after ``spacing`` rounds of ``limit`` successes, one more slot (and the rate grows in
    proportion). Without a limit there is nothing to grow."""
    if limiter.limit is None or count <= 0:
        return verified(limiter)
    successes = limiter.successes + count
    if successes < limiter.limit * limiter.spacing:
        return dataclasses.replace(limiter, successes=successes, verified=True)
    grown = limiter.limit + 1
    passed = limiter.ceiling is None or grown > limiter.ceiling
    return dataclasses.replace(
        limiter,
        limit=grown,
        good=max(limiter.good or 0, limiter.limit),
        ceiling=None if passed else limiter.ceiling,
        successes=0,
        spacing=1 if passed else limiter.spacing,
        rate=limiter.rate * grown / limiter.limit if limiter.rate is not None else None,
        verified=True,
    )


def fair_shares(total: int, wants: Mapping[str, int], rotation: int = 0) -> dict[str, int]:
    """Splits ``total`` slots between holders by water-filling: everyone gets what it wants if
    that fits; otherwise each gets an equal share, and what a holder wanting less leaves goes to
    the others. A remainder that cannot be split goes to the holders in id order rotated by
    ``rotation`` (callers pass a number that changes every :data:`SHARE_ROTATION_SECONDS`), so
    with fewer slots than busy workers every worker gets its turn, and every worker computing
    this from the same record at about the same time gets the same answer."""
    order = sorted(wants)
    if order:
        k = rotation % len(order)
        order = order[k:] + order[:k]
    shares = dict.fromkeys(wants, 0)
    remaining = {h: wants[h] for h in order if wants[h] > 0}
    left = max(0, total)
    while left > 0 and remaining:
        level = left // len(remaining)
        if level == 0:
            for holder in list(remaining)[:left]:
                shares[holder] += 1
            break
        for holder, want in remaining.items():
            give = min(level, want)
            shares[holder] += give
            left -= give
            remaining[holder] = want - give
        remaining = {h: w for h, w in remaining.items() if w > 0}
    return shares


def rotation(now: float) -> int:
    """The ``rotation`` of :func:`fair_shares` at wall-clock time ``now``."""
    return int(now // SHARE_ROTATION_SECONDS)
