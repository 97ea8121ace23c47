"""Each receiver's share of a webhook sender's slots (``charai.webhook_sender.receivers``), on a
ManualClock: a receiver not known to be quick gets at most its share, a quick one may take more
until one of its attempts is slow, quickness lasts a while and is vouched for only by a post."""

from __future__ import annotations

import pytest
from charai.core.clock import ManualClock
from charai.task_store.webhooks import receiver
from charai.webhook_sender import receivers as module
from charai.webhook_sender.receivers import Receivers, park_delay


def attempt(
    shares: Receivers, clock: ManualClock, receiver: str, seconds: float, *, posted: bool = True
) -> None:
    """One attempt to ``receiver`` whose post (if ``posted``) takes ``seconds``."""
    started = shares.admit(receiver)
    assert started is not None
    clock.advance(seconds)
    shares.done(receiver, started, seconds if posted else None)


def test_a_receiver_not_known_to_be_quick_gets_its_share_and_no_more() -> None:
    shares = Receivers(2, ManualClock())
    assert shares.admit("a.test") is not None and shares.admit("a.test") is not None
    assert shares.admit("a.test") is None
    assert shares.admit("b.test:8443") is not None  # another receiver has its own share
    assert shares.admit("") is not None  # a job naming no receiver is not bounded
    assert all(Receivers(0, ManualClock()).admit("a.test") is not None for _ in range(10))
    assert shares.in_flight("a.test") == 2


def test_a_quick_receiver_may_take_more_until_one_of_its_attempts_is_slow() -> None:
    clock = ManualClock()
    shares = Receivers(2, clock)
    attempt(shares, clock, "a.test", 0.1)  # quick: vouches for a.test
    assert all(shares.admit("a.test") is not None for _ in range(5))
    clock.advance(1.9)
    assert shares.admit("a.test") is not None  # the oldest in flight: 1.9 s
    clock.advance(0.1)
    assert shares.admit("a.test") is None  # 2 s: it may hang
    assert shares.in_flight("a.test") == 6


def test_a_slow_post_or_time_ends_quickness_and_only_a_post_vouches() -> None:
    clock = ManualClock()
    shares = Receivers(1, clock)
    attempt(shares, clock, "a.test", 0.1)
    attempt(shares, clock, "a.test", 2.5)  # slow: no longer vouched for
    assert shares.admit("a.test") is not None and shares.admit("a.test") is None
    shares = Receivers(1, clock)
    attempt(shares, clock, "b.test", 0.1, posted=False)  # its claim said not now: no post
    assert shares.admit("b.test") is not None and shares.admit("b.test") is None
    shares = Receivers(1, clock)
    started = shares.admit("d.test")
    assert started is not None
    clock.advance(3)  # a slow claim and settle (task_store busy), a quick post: the receiver is quick
    shares.done("d.test", started, 0.1)
    assert shares.admit("d.test") is not None and shares.admit("d.test") is not None
    shares = Receivers(1, clock)
    attempt(shares, clock, "c.test", 0.1)
    clock.advance(60)
    assert shares.admit("c.test") is not None and shares.admit("c.test") is None  # no longer vouched for


def test_quick_receivers_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "MAX_REMEMBERED", 3)
    clock = ManualClock()
    shares = Receivers(1, clock)
    for i in range(5):
        attempt(shares, clock, f"r{i}.test", 0)
    assert len(shares._quick_until) == 3
    assert shares.admit("r4.test") is not None and shares.admit("r4.test") is not None  # the newest kept


def test_a_parked_delivery_waits_longer_each_time_up_to_30_s() -> None:
    assert [park_delay(n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 50)] == [1, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_job_names_its_receiver_by_host_and_port_never_with_credentials() -> None:
    assert receiver("https://Hooks.Example.com/in?x=1") == "hooks.example.com"
    assert receiver("http://hooks.test:8080/in") == "hooks.test:8080"
    assert receiver("http://[::1]:9/in") == "[::1]:9"
    assert receiver("https://user:secret@hooks.test/in") == "hooks.test"
    assert receiver("http://hooks.test:99999/in") == ""  # not a port
    assert receiver("not a url") == ""
