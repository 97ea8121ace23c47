"""The shared limiter's arithmetic (charai.core.domain.provider_limit) and the holdings of the
shared record (provider_record, provider_events): pure, wall-clock times passed in."""

from __future__ import annotations

import dataclasses

import pytest
from charai.core.domain import provider_limit as lim
from charai.core.domain import provider_record as rec
from charai.core.domain.breaker import BreakerState
from charai.core.domain.errors import ErrorKind
from charai.core.domain.provider_events import (
    Answered,
    BreakerPolicy,
    RateLimited,
    Refused,
    Successes,
    TrialPassed,
    apply,
)
from charai.core.domain.provider_limit import Limiter
from charai.core.domain.provider_record import Holder, ProviderRecord
from hypothesis import given
from hypothesis import strategies as st

T0 = 1_800_000_000.0
KNOWN = Limiter(verified=True)


def burst(limiter: Limiter, in_flight: int, refused: int) -> Limiter:
    """``refused`` calls out of ``in_flight`` answered 429, one after the other (each refused
    call leaves before the next refusal is seen)."""
    for n in range(refused):
        limiter = lim.rate_limited(limiter, in_flight - n, T0, retry_after=1.0)
    return limiter


# -- the limit ---------------------------------------------------------------------------------
def test_an_unverified_credential_allows_one_call_and_then_no_limit_until_a_429() -> None:
    assert lim.cap(Limiter()) == 1
    assert lim.cap(lim.verified(Limiter())) is None


def test_the_trial_window_stays_under_the_call_timeout() -> None:
    """The calls queued behind a trial call wait within their own timeout: a window as long as the
    timeout (2 s each, as a test once configured) failed them as timeouts with no provider call."""
    assert lim.trial_window(60.0) == lim.TRIAL_SECONDS
    assert lim.trial_window(4.0) == lim.TRIAL_SECONDS
    assert lim.trial_window(2.0) == 1.0
    assert lim.trial_window(0.5) == 0.25


def test_a_burst_of_refusals_ends_at_what_the_provider_admitted() -> None:
    """128 calls at once against a provider admitting 50: 78 refusals teach 50, not less."""
    limiter = burst(KNOWN, 128, 78)
    assert (limiter.limit, limiter.good) == (50, 50)
    assert limiter.paused_until == T0 + 1.0  # a refusal below the known level pauses everyone
    assert limiter.rate is None  # no full window: a burst teaches no rate


def test_growth_needs_a_round_of_successes_and_a_failed_probe_spaces_the_next_one() -> None:
    limiter = burst(KNOWN, 51, 1)  # limit 50
    limiter = lim.succeeded(limiter, 49)
    assert limiter.limit == 50
    limiter = lim.succeeded(limiter, 1)
    assert (limiter.limit, limiter.good, limiter.spacing) == (51, 50, 1)
    spacings = []
    for _ in range(6):  # the provider admits 50: every probe at 51 fails
        limiter = lim.rate_limited(limiter, 51, T0 + 10, retry_after=1.0)
        assert limiter.limit == 50 and limiter.paused_until == T0 + 1.0  # a probe pauses nobody
        spacings.append(limiter.spacing)
        limiter = lim.succeeded(limiter, 50 * limiter.spacing - 1)
        assert limiter.limit == 50
        limiter = lim.succeeded(limiter, 1)
        assert limiter.limit == 51
    assert spacings == [2, 4, 8, 16, 16, 16]


def test_the_other_refusals_of_one_overshoot_pause_nobody() -> None:
    """Two calls above the limit at once (the workers saw each other's holdings late): the
    second refusal comes at 50 - 1, still our own overshoot, not the provider tightening."""
    limiter = dataclasses.replace(KNOWN, limit=51, good=50)
    limiter = lim.rate_limited(limiter, 52, T0, retry_after=1.0)
    limiter = lim.rate_limited(limiter, 50, T0, retry_after=1.0, admitted_rate=90.0)
    assert (limiter.limit, limiter.paused_until, limiter.rate) == (49, 0.0, None)
    assert lim.rate_limited(limiter, 40, T0, retry_after=1.0).paused_until == T0 + 1  # well below


def test_growing_past_the_failed_level_resets_the_spacing() -> None:
    limiter = dataclasses.replace(KNOWN, limit=51, good=50)
    limiter = lim.rate_limited(limiter, 51, T0)
    assert (limiter.limit, limiter.ceiling, limiter.spacing) == (50, 51, 2)
    limiter = lim.succeeded(limiter, 100)  # 51 again: probed, spacing kept
    assert (limiter.limit, limiter.spacing) == (51, 2)
    limiter = lim.succeeded(limiter, 102)  # 51 held for two rounds: the provider admits more now
    assert (limiter.limit, limiter.good, limiter.ceiling, limiter.spacing) == (52, 51, None, 1)


def test_a_refusal_below_the_proven_level_lowers_the_limit_learns_the_rate_and_pauses() -> None:
    limiter = dataclasses.replace(KNOWN, limit=50, good=50)
    limiter = lim.rate_limited(limiter, 40, T0, retry_after=20.0, admitted_rate=80.0)
    assert (limiter.limit, limiter.good, limiter.paused_until) == (39, 39, T0 + 20)
    assert limiter.rate == pytest.approx(80.0 * 39 / 40)
    assert lim.rate_at(limiter, T0 + lim.RATE_MEMORY - 1) == limiter.rate
    assert lim.rate_at(limiter, T0 + lim.RATE_MEMORY) is None  # forgotten after a while
    grown = lim.succeeded(limiter, 39)
    assert limiter.rate is not None
    assert grown.limit == 40 and grown.rate == pytest.approx(limiter.rate * 40 / 39)  # together


def test_successes_without_a_limit_only_verify() -> None:
    assert lim.succeeded(Limiter(), 10) == Limiter(verified=True)


# -- fair shares --------------------------------------------------------------------------------
def test_fair_shares_split_evenly_and_give_what_one_leaves_to_the_others() -> None:
    assert lim.fair_shares(50, {"a": 64, "b": 64}) == {"a": 25, "b": 25}
    assert lim.fair_shares(50, {"a": 10, "b": 64}) == {"a": 10, "b": 40}
    assert lim.fair_shares(50, {"a": 10, "b": 20}) == {"a": 10, "b": 20}
    assert lim.fair_shares(51, {"a": 64, "b": 64}) in ({"a": 26, "b": 25}, {"a": 25, "b": 26})


def test_an_odd_slot_rotates_between_busy_workers() -> None:
    owners = {next(k for k, v in lim.fair_shares(1, {"a": 5, "b": 5}, r).items() if v) for r in range(4)}
    assert owners == {"a", "b"}


@given(
    st.integers(0, 200),
    st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.integers(0, 100), max_size=6),
    st.integers(0, 10),
)
def test_fair_shares_properties(total: int, wants: dict[str, int], rotation: int) -> None:
    shares = lim.fair_shares(total, wants, rotation)
    assert sum(shares.values()) == min(total, sum(wants.values()))
    assert all(0 <= shares[h] <= wants[h] for h in wants)
    # Max-min fair: a holder short of its want has at least everyone else's share minus one.
    for h, want in wants.items():
        if shares[h] < want:
            assert all(shares[h] >= s - 1 for s in shares.values())


# -- the record ---------------------------------------------------------------------------------
def record(limit: int | None = 50, **holders: Holder) -> ProviderRecord:
    limiter = dataclasses.replace(KNOWN, limit=limit, good=limit)
    return ProviderRecord("c0ffee", "image", "zhipu", "glm-image", limiter, holders=holders)


def test_the_credential_id_hides_the_key_and_changes_with_it() -> None:
    key = "test-key-" + "0123456789" * 3  # not a real key: only its hash may show
    cid = rec.credential_id("zhipu", "https://open.bigmodel.cn/api/paas/v4/", key)
    assert len(cid) == 16 and int(cid, 16) >= 0 and key[:8] not in cid
    assert cid == rec.credential_id("ZHIPU", "https://open.bigmodel.cn/api/paas/v4", key)
    assert cid != rec.credential_id("zhipu", "https://open.bigmodel.cn/api/paas/v4", key + "x")
    assert cid != rec.credential_id("openai", "https://open.bigmodel.cn/api/paas/v4", key)
    assert rec.record_key(cid, "glm-image") == f"{cid}.glm-image"
    odd = rec.record_key(cid, "a model/v2")
    assert odd.startswith(f"{cid}.") and " " not in odd and "/" not in odd


def test_a_record_survives_encoding_and_tolerates_other_versions() -> None:
    r = apply(
        record(50, w1=Holder(3, 5, 2, T0)), "w1", Refused(ErrorKind.PROVIDER_AUTH, "no", T0), BreakerPolicy()
    )
    assert rec.decode(rec.encode(r)) == r
    assert rec.decode(b'{"credential":"c","future":1,"limiter":{"limit":3,"new":2}}').limiter.limit == 3
    with pytest.raises(ValueError, match="not a provider record"):
        rec.decode(b"[1]")


def test_holdings_grow_only_into_free_slots() -> None:
    r = record(50, a=Holder(held=30, want=30, in_flight=30, seen=T0))
    r = rec.allot(r, "b", in_flight=0, want=64, now=T0)
    assert r.holders["b"].held == 20  # 50 - 30 free, although b's share is 25
    assert r.held == 50


def test_a_short_worker_makes_the_other_give_back_idle_slots_down_to_its_share() -> None:
    r = record(50, a=Holder(held=40, want=40, in_flight=40, seen=T0), b=Holder(10, 64, 10, T0))
    # a is busy with 40: it keeps what it has in flight even above its share...
    assert rec.allot(r, "a", in_flight=40, want=64, now=T0).holders["a"].held == 40
    assert rec.usable(r, "a", 64, T0) == 25  # ...but starts nothing more while b is short
    # ...and gives back down to its share as its calls end.
    assert rec.allot(r, "a", in_flight=20, want=64, now=T0).holders["a"].held == 25


def test_idle_slots_are_kept_while_nobody_else_is_short() -> None:
    r = record(50, a=Holder(held=30, want=30, in_flight=30, seen=T0), b=Holder(5, 5, 5, T0))
    assert rec.allot(r, "a", in_flight=2, want=2, now=T0).holders["a"].held == 30
    assert rec.allot(r, "a", in_flight=2, want=2, now=T0, keep_idle=False).holders["a"].held == 2


def test_a_lower_limit_shrinks_usable_slots_at_once() -> None:
    r = record(50, a=Holder(25, 64, 25, T0), b=Holder(25, 64, 25, T0))
    lowered = r.with_limiter(dataclasses.replace(r.limiter, limit=30))
    # a's share is 15, but b still has 25 in flight: a starts nothing the provider would refuse
    # until b has drained down to its own share.
    assert rec.usable(lowered, "a", 64, T0) == 5
    drained = rec.allot(lowered, "b", in_flight=15, want=64, now=T0)
    assert rec.usable(drained, "a", 64, T0) == 15
    assert rec.allot(lowered, "a", in_flight=25, want=64, now=T0).holders["a"].held == 25  # in flight
    assert rec.allot(lowered, "a", in_flight=10, want=64, now=T0).holders["a"].held == 15


def test_without_a_limit_a_holding_is_what_the_worker_wants() -> None:
    r = record(None)
    assert rec.usable(r, "a", 64, T0) is None
    assert rec.allot(r, "a", in_flight=60, want=64, now=T0).holders["a"].held == 64


def test_a_crashed_workers_holding_expires_after_the_lease() -> None:
    r = record(50, a=Holder(25, 64, 25, T0), b=Holder(25, 64, 25, T0 + 10))
    assert set(r.live(T0 + 14, 15).holders) == {"a", "b"}
    assert set(r.live(T0 + 16, 15).holders) == {"b"}


def test_a_429_counts_the_other_workers_holdings_as_in_flight() -> None:
    r = record(51, a=Holder(26, 64, 26, T0), b=Holder(25, 64, 25, T0))
    r = r.with_limiter(dataclasses.replace(r.limiter, good=50))  # probing one above 50
    after = apply(r, "a", RateLimited(own_in_flight=26, at=T0), BreakerPolicy())
    assert after.limiter.limit == 50 and after.limiter.spacing == 2  # 51 in flight: a probe


def test_events_verify_count_and_open_the_breaker() -> None:
    policy = BreakerPolicy(base=10, cap=20)
    r = ProviderRecord("c", "tts", "openai", "tts-1")
    assert apply(r, "a", TrialPassed(), policy).limiter.verified
    assert apply(r, "a", Answered(), policy).limiter.verified
    counted = apply(record(50), "a", Successes(50), policy)
    assert counted.limiter.limit == 51
    opened = apply(r, "a", Refused(ErrorKind.QUOTA_EXHAUSTED, "empty", T0), policy)
    assert (opened.breaker.state, opened.breaker.retry_at) == (BreakerState.OPEN, T0 + 10)


def test_two_workers_writing_in_turns_never_hold_more_than_the_limit() -> None:
    """Compare-and-set in miniature: each write starts from the record the last one left; between
    two writes a worker's calls end and only as many start again as it may use."""
    r = record(50)
    wants = {"a": 64, "b": 64}
    for step in range(20):
        me = "ab"[step % 2]
        usable = rec.usable(r, me, wants[me], T0)
        in_flight = min(wants[me], usable if usable is not None else wants[me])
        r = rec.allot(r, me, in_flight=in_flight, want=wants[me], now=T0)
        assert r.held <= 50
    assert {k: h.held for k, h in r.holders.items()} == {"a": 25, "b": 25}
