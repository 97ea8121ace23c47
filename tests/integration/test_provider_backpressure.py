"""ProviderHttp against the real emulator: 429s retried inside the attempt, and the adaptive
limit on calls in flight (ProviderGate) meeting a provider that admits fewer calls than the
worker runs jobs (benchmark B6: 64 jobs, a provider that admits 50).

Markers in the text make the emulator misbehave: ``[[rate*N:S]]`` answers the first N calls
of that text 429 with ``Retry-After: S`` (every call without ``*N``).

No upper time bounds (a shared CI machine makes any of them flaky): how long a call decided to
wait is read from its ``provider_rate_limited_retrying_in_attempt`` log line, that it did not wait
is shown by that line's absence or by the order things happened in; how fast the gate keeps the
provider busy is benchmark B6's to measure (``make bench``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import pytest
from charai.core.domain.errors import ErrorKind
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.worker.gate import ProviderGate
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError, Response
from structlog.testing import capture_logs

from tests.conftest import eventually

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


RETRYING = "provider_rate_limited_retrying_in_attempt"


def waits(lines: Sequence[Mapping[str, Any]]) -> list[float]:
    """The waits (seconds) ProviderHttp announced before calling again inside the attempt."""
    return [float(line["wait"]) for line in lines if line["event"] == RETRYING]


async def test_a_short_retry_after_is_waited_and_retried_inside_the_attempt(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    http = provider(session, emu)
    text = "a kite [[rate*2:0.3]]"
    with capture_logs() as lines:
        started = time.monotonic()
        response = await generate(http, text)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert calls(emu, text) == 3
    # Each wait is the Retry-After plus at most 25 % jitter (logged rounded to the millisecond)...
    assert len(waits(lines)) == 2 and all(0.3 <= w <= 0.3 * 1.25 + 0.001 for w in waits(lines)), lines
    # ...and was really waited.
    assert elapsed >= 2 * 0.3, f"Retry-After 0.3 s not waited twice ({elapsed:.2f} s)"
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
    with capture_logs() as lines, pytest.raises(ProviderError) as caught:
        await generate(http, text)
    assert waits(lines) == [], "a 6 s Retry-After was waited inside the attempt"
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
    waits alone and the others (the limit is 1 after the 429, so one at a time) go on.

    The refused call is told to come back in ten minutes (the longest Retry-After honoured) and
    allowed to wait that long, so "the others go on" is an order, not a race: they all complete
    while it still waits. (That a waited Retry-After ends in a successful call is the first
    test's.)"""
    http = provider(session, emu, rate_limit_max_wait=1200.0)
    with capture_logs() as lines:
        limited = asyncio.create_task(generate(http, "a storm [[rate*1:600]]"))
        # Refused, and out of its slot: from there the call only waits (no await in between).
        await eventually(
            lambda: emu.stats()["statuses"].get("429", 0) == 1 and http.gate.in_flight == 0, interval=0.01
        )
        assert [w >= 600 for w in waits(lines)] == [True], lines
        try:
            for n in range(3):
                assert (await generate(http, f"a calm sea {n}")).status == 200
            assert not limited.done(), "the refused call did not wait for its Retry-After"
        finally:
            limited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await limited
    assert calls(emu, "a storm [[rate*1:600]]") == 1
    assert (http.gate.in_flight, http.gate.waiting) == (0, 0)


async def test_waiting_for_a_slot_is_bounded_by_the_call_timeout(
    emu: RunningEmulator, session: aiohttp.ClientSession
) -> None:
    """A slot that never frees (the calls ahead hang) fails the attempt as a timeout, retried by
    the store, instead of parking the job for good; the call never reaches the provider."""
    http = provider(session, emu, ProviderGate(ceiling=1), timeout=0.3)
    await http.gate.acquire()  # a call that hangs: the slot never frees, only the timeout ends the wait
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await generate(http, "a queue")
    assert time.monotonic() - started > 0.25
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT
    assert "no free slot to the provider within 0.3 s" in caught.value.failure.message
    assert (calls(emu, "a queue"), http.gate.in_flight, http.gate.waiting) == (0, 1, 0)


async def test_64_concurrent_calls_against_a_provider_that_admits_50(session: aiohttp.ClientSession) -> None:
    """Benchmark B6 in small: 64 callers, each making calls one after the other, against a
    provider that answers 429 (Retry-After: 1) beyond 50 calls in flight. The first burst costs
    the 14 refusals that teach the gate the limit; after that the gate keeps the calls at the
    provider's 50 (probing one above now and then), so every call succeeds inside its attempt
    and few are refused (that the provider stays busy, a makespan near calls / 50 x latency, is
    for the benchmark to measure)."""
    latency, rounds, callers = 0.1, 12, 64
    config = EmulatorConfig(latency_min=latency, latency_max=latency, max_concurrency=50)
    async with running_emulator(config) as emu:
        http = provider(session, emu)

        async def caller(n: int) -> None:
            for r in range(rounds):
                assert (await generate(http, f"caller {n} round {r}")).status == 200

        await asyncio.gather(*(caller(n) for n in range(callers)))
        stats = emu.stats()
    total = callers * rounds
    rejected = int(stats["concurrency"]["rejected"])
    assert stats["statuses"].get("200", 0) == total
    assert stats["concurrency"]["peak"] <= 50
    # The first burst (14) plus about one probe per round trip at the limit.
    assert rejected <= 14 + total // 25, f"{rejected} of {total + rejected} calls refused"
    assert 40 <= (http.gate.limit or 0) <= 52, f"the limit settled at {http.gate.limit}"
    # The makespan (near calls / 50 x latency) is benchmark B6's to measure, not a test's.
