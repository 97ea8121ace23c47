"""The webhook sender's lookups (``charai.worker.egress.CachedResolve``) on a ManualClock: an
answer is kept for its time, per host and port; a failed lookup is not kept; the cache is
bounded; and the SSRF check still judges a kept answer on every request."""

from __future__ import annotations

import pytest
from charai.core.clock import ManualClock
from charai.worker.egress import CachedResolve, EgressRefusedError, vet_url


class Lookups:
    """A resolver that answers from ``answers`` (host -> addresses) and counts its lookups."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.answers:
            raise OSError("no such host")
        return list(self.answers[host])


async def test_an_answer_is_kept_for_its_time_per_host_and_port() -> None:
    clock = ManualClock()
    lookups = Lookups({"hooks.test": ["203.0.113.7"], "other.test": ["203.0.113.8"]})
    resolve = CachedResolve(lookups, ttl=10, clock=clock)
    assert await resolve("hooks.test", 443) == ["203.0.113.7"]
    clock.advance(9.9)
    assert await resolve("HOOKS.test", 443) == ["203.0.113.7"]  # names are not case-sensitive
    assert await resolve("hooks.test", 8443) == ["203.0.113.7"]
    assert await resolve("other.test", 443) == ["203.0.113.8"]
    assert lookups.asked == [("hooks.test", 443), ("hooks.test", 8443), ("other.test", 443)]
    lookups.answers["hooks.test"] = ["203.0.113.9"]
    clock.advance(0.1)  # 10 s after the first lookup: asked again
    assert await resolve("hooks.test", 443) == ["203.0.113.9"]
    assert len(lookups.asked) == 4


async def test_a_failed_lookup_is_not_kept() -> None:
    clock = ManualClock()
    lookups = Lookups({})
    resolve = CachedResolve(lookups, clock=clock)
    with pytest.raises(OSError):
        await resolve("late.test", 443)
    lookups.answers["late.test"] = ["203.0.113.7"]
    assert await resolve("late.test", 443) == ["203.0.113.7"]  # at once, not after a while


async def test_at_most_max_hosts_answers_are_kept_the_oldest_goes_first() -> None:
    lookups = Lookups({f"h{i}.test": ["203.0.113.7"] for i in range(3)})
    resolve = CachedResolve(lookups, max_hosts=2, clock=ManualClock())
    for host in ("h0.test", "h1.test", "h2.test", "h1.test", "h2.test", "h0.test"):
        await resolve(host, 443)
    assert [host for host, _ in lookups.asked] == ["h0.test", "h1.test", "h2.test", "h0.test"]


async def test_a_kept_answer_is_still_vetted_on_every_request() -> None:
    resolve = CachedResolve(Lookups({"inside.test": ["10.0.0.5"]}), clock=ManualClock())
    url = "https://inside.test/hook"
    assert await vet_url(url, allow_private=True, resolve=resolve) == ["10.0.0.5"]
    with pytest.raises(EgressRefusedError):
        await vet_url(url, allow_private=False, resolve=resolve)
