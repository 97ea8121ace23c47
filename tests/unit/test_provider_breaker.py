"""The credential's circuit breaker (charai.core.domain.breaker): pure transitions, wall-clock
times passed in."""

from __future__ import annotations

import pytest
from charai.core.domain import breaker as brk
from charai.core.domain.breaker import Admission, BreakerState
from charai.core.domain.errors import ErrorKind

T0 = 1_800_000_000.0
AUTH = ErrorKind.PROVIDER_AUTH


def open_breaker(at: float = T0, base: float = 30.0) -> brk.Breaker:
    return brk.opened(brk.CLOSED, AUTH, "refused", at, base=base, cap=900.0)


def test_a_closed_breaker_passes_every_call() -> None:
    assert brk.admit(brk.CLOSED, T0) is Admission.PASS
    assert brk.CLOSED.kind is None


def test_the_first_refusal_opens_it_with_the_base_backoff_and_rejects_until_then() -> None:
    b = open_breaker()
    assert (b.state, b.kind, b.retry_at, b.backoff) == (BreakerState.OPEN, AUTH, T0 + 30, 30)
    assert brk.admit(b, T0 + 29.9) is Admission.REJECT
    assert brk.admit(b, T0 + 30) is Admission.PROBE


def test_quota_opens_it_too_but_other_kinds_do_not() -> None:
    b = brk.opened(brk.CLOSED, ErrorKind.QUOTA_EXHAUSTED, "empty", T0, base=5, cap=60)
    assert b.kind is ErrorKind.QUOTA_EXHAUSTED
    with pytest.raises(ValueError, match="RATE_LIMITED"):
        brk.opened(brk.CLOSED, ErrorKind.RATE_LIMITED, "x", T0, base=5, cap=60)


def test_exactly_one_probe_wins_and_the_others_are_rejected_while_it_is_out() -> None:
    b = open_breaker()
    assert brk.start_probe(b, "w1", T0 + 10, 60) is None  # backoff not over
    probing = brk.start_probe(b, "w1", T0 + 31, 60)
    assert probing is not None and probing.state is BreakerState.HALF_OPEN and probing.probe == "w1"
    # A second worker re-checking on the record the first one wrote loses.
    assert brk.start_probe(probing, "w2", T0 + 31, 60) is None
    assert brk.admit(probing, T0 + 60) is Admission.REJECT
    # The probe's worker went silent: after probe_until another worker may take over.
    assert brk.admit(probing, T0 + 31 + 60) is Admission.PROBE
    taken = brk.start_probe(probing, "w2", T0 + 92, 60)
    assert taken is not None and taken.probe == "w2"


def test_the_probe_answered_closes_it_but_a_straggler_does_not() -> None:
    probing = brk.start_probe(open_breaker(), "w1", T0 + 31, 60)
    assert probing is not None
    assert brk.answered(probing, "") == probing  # a call that was no probe proves nothing
    assert brk.answered(probing, "w2") == probing
    assert brk.answered(probing, "w1") == brk.CLOSED
    assert brk.answered(open_breaker(), "w1").state is BreakerState.OPEN


def test_a_failed_probe_reopens_with_a_doubled_backoff_up_to_the_cap() -> None:
    b = open_breaker(base=300)
    backoffs = []
    now = T0
    for _ in range(4):
        now = b.retry_at
        probing = brk.start_probe(b, "w1", now, 60)
        assert probing is not None
        b = brk.opened(probing, AUTH, "refused again", now + 1, probe_of="w1", base=300, cap=900)
        backoffs.append(b.backoff)
        assert b.retry_at == now + 1 + b.backoff
    assert backoffs == [600, 900, 900, 900]


def test_a_straggler_refused_while_open_or_probing_changes_nothing() -> None:
    b = open_breaker()
    assert brk.opened(b, AUTH, "late", T0 + 5, base=30, cap=900) == b
    probing = brk.start_probe(b, "w1", T0 + 31, 60)
    assert probing is not None
    assert brk.opened(probing, AUTH, "late", T0 + 32, probe_of="", base=30, cap=900) == probing


def test_an_inconclusive_probe_reopens_with_the_same_backoff() -> None:
    probing = brk.start_probe(open_breaker(), "w1", T0 + 31, 60)
    assert probing is not None
    again = brk.inconclusive(probing, "w1", T0 + 40)
    assert (again.state, again.backoff, again.retry_at, again.probe) == (BreakerState.OPEN, 30, T0 + 70, "")
    assert brk.inconclusive(probing, "w2", T0 + 40) == probing


def test_the_message_names_the_setting_and_quotes_no_provider_text() -> None:
    text = brk.failure_message(AUTH, "CHARAI_IMAGE_API_KEY", "2027-01-15T08:00:00+00:00")
    assert "CHARAI_IMAGE_API_KEY" in text and "no call made" in text
    assert "quota" in brk.failure_message(ErrorKind.QUOTA_EXHAUSTED, "K", "now")
