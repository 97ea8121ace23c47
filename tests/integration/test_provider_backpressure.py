"""ProviderHttp against the real emulator: 429s retried inside the attempt, and the adaptive
limit on calls in flight (ProviderGate) meeting a provider that admits fewer calls than the
worker runs jobs (benchmark B6: 64 jobs, a provider that admits 50).

Markers in the text make the emulator misbehave: ``[[rate*N:S]]`` answers the first N calls
of that text 429 with ``Retry-After: S`` (every call without ``*N``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from charai.core.domain.errors import ErrorKind
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.worker.gate import ProviderGate
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError, Response

FAST = EmulatorConfig(latency_min=0, latency_max=0.01)


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator(FAST) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def provider(
    session: aiohttp.ClientSession, emu: RunningEmulator, gate: ProviderGate | None = None, **config: Any
) -> ProviderHttp:
    settings: dict[str, Any] = {"timeout": 10.0, **config}
    return ProviderHttp(
        session,
        ProviderConfig(
            base_url=emu.api_base,
            api_key="test-key",
            model="glm-tts",
            key_setting="CHARAI_TTS_API_KEY",
            allow_private_urls=True,
            **settings,
        ),
        gate,
    )


async def generate(http: ProviderHttp, text: str) -> Response:
    """One speech call (raw PCM: the cheapest answer for the emulator to make, so that the
    provider's limit, not the emulator's CPU, paces the many-call test)."""
    body = {"model": "glm-tts", "input": text, "response_format": "pcm"}
    return await http.request("POST", "/audio/speech", json_body=body)


def calls(emu: RunningEmulator, text: str) -> int:
    return int(emu.stats()["by_text"].get(text, 0))


async def test_a_short_retry_after_is_waited_and_retried_inside_the_attempt(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu)
    text = "a kite [[rate*2:0.3]]"
    started = time.monotonic()
    response = await generate(http, text)
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert calls(emu, text) == 3
    assert elapsed >= 2 * 0.3, f"Retry-After 0.3 s not waited twice ({elapsed:.2f} s)"
    assert elapsed < 2 * 0.3 * 1.25 + 1.0
    assert (http.gate.in_flight, http.gate.waiting) == (0, 0)


async def test_the_attempt_gives_up_after_the_configured_retries(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu, rate_limit_retries=3)
    text = "a kite [[rate:0.1]]"
    with pytest.raises(ProviderError) as caught:
        await generate(http, text)
    failure = caught.value.failure
    assert (failure.kind, failure.retry_after, failure.provider_code) == (ErrorKind.RATE_LIMITED, 0.1, "1302")
    assert calls(emu, text) == 4  # 1 + 3 retries, then the store's retry policy decides
    assert (http.gate.in_flight, http.gate.waiting) == (0, 0)


async def test_a_long_retry_after_is_left_to_the_store(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu, rate_limit_max_wait=5.0)
    text = "a kite [[rate*1:6]]"
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await generate(http, text)
    assert time.monotonic() - started < 2.0, "a 6 s Retry-After was waited inside the attempt"
    assert (caught.value.failure.kind, caught.value.failure.retry_after) == (ErrorKind.RATE_LIMITED, 6)
    assert calls(emu, text) == 1


async def test_a_429_without_retry_after_is_left_to_the_store(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu)
    text = "a kite [[overload*1]]"
    with pytest.raises(ProviderError) as caught:
        await generate(http, text)
    assert (caught.value.failure.kind, caught.value.failure.retry_after) == (ErrorKind.RATE_LIMITED, None)
    assert calls(emu, text) == 1


async def test_a_rate_limited_call_does_not_hold_up_the_others(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    """The old gate closed for every call of the worker for Retry-After; now the refused call
    waits alone and the others (the limit is 1 after the 429, so one at a time) go on."""
    http = provider(session, emu)
    limited = asyncio.create_task(generate(http, "a storm [[rate*1:1.5]]"))
    while emu.stats()["statuses"].get("429", 0) == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    started = time.monotonic()
    for n in range(3):
        assert (await generate(http, f"a calm sea {n}")).status == 200
    assert time.monotonic() - started < 1.0, "healthy calls waited for another call's Retry-After"
    assert not limited.done()
    assert (await limited).status == 200


async def test_waiting_for_a_slot_is_bounded_by_the_call_timeout(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    """A slot that never frees (the calls ahead hang) fails the attempt as a timeout, retried by
    the store, instead of parking the job for good; the call never reaches the provider."""
    http = provider(session, emu, ProviderGate(ceiling=1), timeout=0.3)
    await http.gate.acquire()  # a call that hangs
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await generate(http, "a queue")
    assert 0.25 < time.monotonic() - started < 1.5
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT
    assert "no free slot" in caught.value.failure.message
    assert (calls(emu, "a queue"), http.gate.in_flight, http.gate.waiting) == (0, 1, 0)


async def test_64_concurrent_calls_against_a_provider_that_admits_50(session: aiohttp.ClientSession) -> None:
    """Benchmark B6 in small: 64 callers, each making calls one after the other, against a
    provider that answers 429 (Retry-After: 1) beyond 50 calls in flight. The first burst costs
    the 14 refusals that teach the gate the limit; after that the gate keeps the calls at the
    provider's 50 (probing one above now and then), so every call succeeds inside its attempt,
    few are refused, and the provider stays busy: the makespan stays near calls / 50 x latency."""
    latency, rounds, callers = 0.1, 12, 64
    config = EmulatorConfig(latency_min=latency, latency_max=latency, max_concurrency=50)
    async with running_emulator(config) as emu:
        http = provider(session, emu)

        async def caller(n: int) -> None:
            for r in range(rounds):
                assert (await generate(http, f"caller {n} round {r}")).status == 200

        started = time.monotonic()
        await asyncio.gather(*(caller(n) for n in range(callers)))
        makespan = time.monotonic() - started
        stats = emu.stats()
    total = callers * rounds
    rejected = int(stats["concurrency"]["rejected"])
    assert stats["statuses"].get("200", 0) == total
    assert stats["concurrency"]["peak"] <= 50
    # The first burst (14) plus about one probe per round trip at the limit.
    assert rejected <= 14 + total // 25, f"{rejected} of {total + rejected} calls refused"
    assert 40 <= (http.gate.limit or 0) <= 52, f"the limit settled at {http.gate.limit}"
    # A caller refused once or twice loses 1-1.25 s each time (its rounds are sequential), and
    # the machine is shared: a loose bound, far below a stop of every call per 429.
    ideal = total / 50 * latency
    assert makespan < ideal + 5.0, f"{makespan:.1f} s for an ideal of {ideal:.1f} s"
