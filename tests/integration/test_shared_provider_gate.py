"""The provider credential's limiter and breaker shared through NATS KV (SharedGate + GateSync),
two "workers" (each its own NATS connection, gate and HTTP session) against the real emulator,
through a proxy that counts the calls both have at the provider at once.

Markers in the text make the emulator misbehave: ``[[rate*N:S]]`` answers the first N calls of
that text 429 with ``Retry-After: S``; ``[[auth]]`` answers 401 (Zhipu code 1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest
from charai.core import natsconn
from charai.core.clock import SYSTEM, Clock, ManualClock
from charai.core.domain.breaker import BreakerState
from charai.core.domain.errors import ErrorKind
from charai.core.domain.provider_events import BreakerPolicy
from charai.core.domain.provider_limit import MAX_SPACING, TRIAL_SECONDS, Limiter
from charai.core.domain.provider_record import ProviderRecord, credential_id
from charai.core.provider_kv import RecordStore, ensure_providers_bucket
from charai.core.topology import Topology
from charai.devstack.inflight import InFlightProxy, inflight_proxy
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.worker.gate_sync import GateSync
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError, Response
from charai.worker.shared_gate import SharedGate
from nats.aio.client import Client

from tests.conftest import NatsServer, eventually

TOPOLOGY = Topology("gates")
_ids = itertools.count()
#: Each test worker's NATS connection, by its holder id (a test cuts one to play a crash).
_connections: dict[str, Client] = {}


@contextlib.asynccontextmanager
async def worker(
    nats_url: str,
    base_url: str,
    key: str = "good-key",
    *,
    clock: Clock = SYSTEM,
    policy: BreakerPolicy | None = None,
    lease: float = 15.0,
    trial_seconds: float = TRIAL_SECONDS,
) -> AsyncIterator[ProviderHttp]:
    """One worker's provider client: its own NATS connection, shared gate and HTTP session."""
    nc = await natsconn.connect([nats_url], "gate-test")
    try:
        kv = await ensure_providers_bucket(nc.jetstream(), TOPOLOGY)
        base = ProviderRecord(credential_id("zhipu", base_url, key), "tts", "zhipu", "glm-tts")
        gate = SharedGate(
            base,
            holder=f"w{next(_ids)}",
            key_setting="CHARAI_TTS_API_KEY",
            policy=policy,
            lease=lease,
            trial_seconds=trial_seconds,
            clock=clock,
        )
        config = ProviderConfig(
            base_url=base_url,
            api_key=key,
            model="glm-tts",
            key_setting="CHARAI_TTS_API_KEY",
            allow_private_urls=True,
            timeout=30.0,
        )
        _connections[gate.me] = nc
        sync = GateSync(gate, RecordStore(kv, base.key), connected=lambda: nc.is_connected, clock=clock)
        async with aiohttp.ClientSession() as session, sync:
            yield ProviderHttp(session, config, gate)
    finally:
        await nc.close()


def gate_of(http: ProviderHttp) -> SharedGate:
    assert isinstance(http.gate, SharedGate)
    return http.gate


async def speak(http: ProviderHttp, text: str) -> Response:
    body = {"model": "glm-tts", "input": text, "response_format": "pcm"}
    return await http.request("POST", "/audio/speech", json_body=body)


@contextlib.asynccontextmanager
async def provider(config: EmulatorConfig) -> AsyncIterator[tuple[RunningEmulator, InFlightProxy]]:
    async with running_emulator(config) as emu, inflight_proxy(emu.url) as proxy:
        yield emu, proxy


async def run_callers(workers: list[ProviderHttp], callers: int, rounds: int, tag: str) -> None:
    """``callers`` per worker, each making ``rounds`` calls one after the other."""

    async def caller(w: int, n: int) -> None:
        for r in range(rounds):
            assert (await speak(workers[w], f"{tag} w{w} c{n} r{r}")).status == 200

    await asyncio.gather(*(caller(w, n) for w in range(len(workers)) for n in range(callers)))


async def test_two_workers_share_one_learned_limit(nats_url: str) -> None:
    """Two workers of 16 callers each against a provider admitting 8: after one learning burst,
    both together keep within the learned limit (a few above at most, when probing), and 429s
    stay under 2 % of the calls."""
    latency, admits = 0.05, 8
    config = EmulatorConfig(latency_min=latency, latency_max=latency, max_concurrency=admits)
    async with provider(config) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        async with worker(nats_url, api) as a, worker(nats_url, api) as b:
            await run_callers([a, b], 16, 4, "learn")
            learned = gate_of(a).limit
            assert learned is not None and admits - 2 <= learned <= admits + 1, learned
            emu.reset()
            proxy.reset_peak()
            await run_callers([a, b], 16, 25, "steady")
            stats = emu.stats()
            limits = (gate_of(a).limit, gate_of(b).limit)
    calls = int(stats["calls"]["audio.speech"])
    rejected = int(stats["concurrency"]["rejected"])
    assert stats["statuses"].get("200", 0) == 2 * 16 * 25
    assert proxy.peak <= max(x or 0 for x in limits) + 2, (proxy.peak, limits)
    assert rejected <= 0.02 * calls, f"{rejected} of {calls} calls refused"


async def test_a_retry_after_pauses_every_worker_and_the_end_of_the_pause_is_no_herd(
    nats_url: str,
) -> None:
    """A 429 below the known level (here: the first one, one call in flight) pauses every
    worker for its Retry-After: no call of either worker reaches the provider before the pause
    ends. Then only the free slots of the (lowered) limit proceed, in order: 20 waiting calls do
    not arrive at once."""
    config = EmulatorConfig(latency_min=0.05, latency_max=0.05)
    async with provider(config) as (_, proxy):
        api = proxy.url + "/api/paas/v4"
        async with worker(nats_url, api) as a, worker(nats_url, api) as b:
            await speak(a, "hello")  # the key is verified: no limit until a 429
            stop = asyncio.create_task(speak(a, "stop [[rate*1:1.5]]"))
            await eventually(lambda: gate_of(b).view.limiter.paused_until > 0)
            paused_until = gate_of(b).view.limiter.paused_until
            assert gate_of(b).limit == 1  # one call was in flight: the provider admitted none more
            seen = len(proxy.arrivals)
            proxy.reset_peak()
            waiting = [asyncio.create_task(speak(w, f"after {n}")) for n in range(10) for w in (a, b)]
            assert all(r.status == 200 for r in await asyncio.gather(stop, *waiting))
            limit = max(gate_of(a).limit or 0, gate_of(b).limit or 0)
    later = proxy.arrivals[seen:]
    assert len(later) == 21  # the 20 calls and the refused one's retry
    assert min(t for t, *_ in later) >= paused_until, "a call reached the provider during the pause"
    # The limit only grew during this phase (no 429): the peak stayed within it, far below 21.
    assert proxy.peak <= limit < 10, (proxy.peak, limit)


async def test_a_bad_key_opens_the_breaker_for_every_worker(nats_url: str) -> None:
    """20 calls with a refused key across two workers: one provider call (a new credential is
    tried with one call first), all 20 fail with PROVIDER_AUTH. After the backoff exactly one
    call (the probe) tries again; refused again, the breaker reopens with a doubled backoff."""
    clock = ManualClock(start=1_900_000_000.0)
    policy = BreakerPolicy(base=30, cap=600, probe_timeout=60)
    async with provider(EmulatorConfig(latency_min=0, latency_max=0.01, api_key="good-key")) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        async with (
            worker(nats_url, api, "bad-key", clock=clock, policy=policy, lease=3600) as a,
            worker(nats_url, api, "bad-key", clock=clock, policy=policy, lease=3600) as b,
        ):

            async def fail_all(tag: str) -> list[BaseException | Response]:
                calls = [speak(w, f"{tag} {n}") for n in range(10) for w in (a, b)]
                return await asyncio.gather(*calls, return_exceptions=True)

            results = await fail_all("first")
            assert emu.stats()["statuses"] == {"401": 1}
            for result in results:
                assert isinstance(result, ProviderError), result
                assert result.failure.kind is ErrorKind.PROVIDER_AUTH
                assert "CHARAI_TTS_API_KEY" in result.failure.message and "bad-key" not in str(result)
            await eventually(lambda: gate_of(b).view.breaker.state is BreakerState.OPEN)
            opened = gate_of(b).view.breaker
            assert (opened.kind, opened.backoff) == (ErrorKind.PROVIDER_AUTH, 30)

            clock.advance(31)  # the backoff is over: one probe, across both workers
            results = await fail_all("probe")
            assert emu.stats()["statuses"] == {"401": 2}
            assert all(
                isinstance(r, ProviderError) and r.failure.kind is ErrorKind.PROVIDER_AUTH for r in results
            )
            await eventually(lambda: gate_of(a).view.breaker.backoff == 60)
            assert gate_of(a).view.breaker.state is BreakerState.OPEN

        # A restart with the right key is another credential: its breaker starts closed.
        async with worker(nats_url, api, "good-key", clock=clock, policy=policy, lease=3600) as fixed:
            assert (await speak(fixed, "fixed")).status == 200
            assert gate_of(fixed).view.breaker.state is BreakerState.CLOSED


async def test_an_empty_account_opens_the_breaker_and_a_successful_probe_closes_it(nats_url: str) -> None:
    clock = ManualClock(start=1_900_000_000.0)
    policy = BreakerPolicy(base=30, cap=600, probe_timeout=60)
    async with provider(EmulatorConfig(latency_min=0, latency_max=0.01)) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        async with (
            worker(nats_url, api, clock=clock, policy=policy, lease=3600) as a,
            worker(nats_url, api, clock=clock, policy=policy, lease=3600) as b,
        ):
            assert (await speak(a, "warm")).status == 200
            with pytest.raises(ProviderError) as caught:
                await speak(a, "spend [[quota*1]]")
            assert caught.value.failure.kind is ErrorKind.QUOTA_EXHAUSTED
            await eventually(lambda: gate_of(b).view.breaker.state is BreakerState.OPEN)
            with pytest.raises(ProviderError) as caught:
                await speak(b, "refused at once")
            assert caught.value.failure.kind is ErrorKind.QUOTA_EXHAUSTED
            assert emu.stats()["by_text"].get("refused at once") is None  # no provider call

            clock.advance(31)
            assert (await speak(b, "topped up")).status == 200  # the probe: answered, so closed
            await eventually(lambda: gate_of(a).view.breaker.state is BreakerState.CLOSED)
            assert (await speak(a, "flowing again")).status == 200


async def test_a_crashed_workers_slots_go_back_to_the_others_after_the_lease(nats_url: str) -> None:
    """A worker holding every slot of a learned limit of 4 dies without a word (its NATS
    connection cut, so its holding is never taken out of the record): after the lease the other
    worker drops it and gets all 4 slots."""
    async with provider(EmulatorConfig(latency_min=0, latency_max=0)) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        await seed_limit(nats_url, api, limit=4)
        crashed = worker(nats_url, api, lease=0.6)
        a = await crashed.__aenter__()
        emu.close_gate()
        held = [asyncio.create_task(speak(a, f"held {n}")) for n in range(4)]
        await emu.wait_held(4)
        async with worker(nats_url, api, lease=0.6) as b:
            await eventually(lambda: len(gate_of(b).view.holders) == 2)
            waiting = [asyncio.create_task(speak(b, f"waiting {n}")) for n in range(4)]
            assert gate_of(b).in_flight == 0  # all 4 slots are a's
            await _connections[gate_of(a).me].close()  # no heartbeat, no goodbye from now on
            for task in held:  # a's calls die with it
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await eventually(lambda: emu.held == 0)
            await emu.wait_held(4)  # b's 4 calls, once a's holding expired
            emu.open_gate()
            assert all(r.status == 200 for r in await asyncio.gather(*waiting))
            assert list(gate_of(b).view.holders) == [gate_of(b).me]
        with contextlib.suppress(Exception):
            await crashed.__aexit__(None, None, None)


async def seed_limit(nats_url: str, base_url: str, *, limit: int, key: str = "good-key") -> None:
    """Writes a credential record whose limit is already learned (a cluster that ran before)."""
    nc = await natsconn.connect([nats_url], "gate-seed")
    try:
        kv = await ensure_providers_bucket(nc.jetstream(), TOPOLOGY)
        limiter = Limiter(limit=limit, good=limit, spacing=MAX_SPACING, verified=True)
        record = ProviderRecord(credential_id("zhipu", base_url, key), "tts", "zhipu", "glm-tts", limiter)
        await RecordStore(kv, record.key).write(record, 0)
    finally:
        await nc.close()


async def test_with_nats_away_each_worker_keeps_to_its_part_of_the_last_known_limit(
    nats_server: NatsServer,
) -> None:
    """NATS stops: the two workers fall back to the last known limit (6) divided between them,
    so together they still never have more than 6 calls at the provider; their calls go on.
    When NATS is back, they share the record again."""
    async with provider(EmulatorConfig(latency_min=0.02, latency_max=0.02)) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        await seed_limit(nats_server.url, api, limit=6)
        async with worker(nats_server.url, api) as a, worker(nats_server.url, api) as b:
            await eventually(lambda: all(len(gate_of(w).view.holders) == 2 for w in (a, b)))
            nats_server.stop()
            proxy.reset_peak()
            await run_callers([a, b], 8, 5, "cut off")
            assert gate_of(a).degraded and gate_of(b).degraded
            assert proxy.peak <= 6, proxy.peak
            nats_server.start()
            await eventually(lambda: not gate_of(a).degraded and not gate_of(b).degraded, timeout=30)
            assert (await speak(a, "back")).status == 200
    assert emu.stats()["statuses"] == {"200": 81}


async def test_a_slow_trial_call_releases_the_calls_behind_it_after_the_trial_window(nats_url: str) -> None:
    """A new credential's first call hangs; the next call waits for a slot (one call at a time
    until the key is accepted). It goes to the provider once the trial call has run for the gate's
    trial window (the worker sets it under its call timeout), not a moment before."""
    clock = ManualClock(start=1_900_000_000.0)
    async with provider(EmulatorConfig(latency_min=0, latency_max=0.01, api_key="good-key")) as (emu, proxy):
        api = proxy.url + "/api/paas/v4"
        async with worker(nats_url, api, "good-key", clock=clock, lease=3600, trial_seconds=1.0) as w:
            hanging = asyncio.create_task(speak(w, "trial [[hang:60]]"))
            await eventually(lambda: clock.sleepers >= 1)  # the trial's window runs
            queued = asyncio.create_task(speak(w, "behind the trial"))
            clock.advance(0.9)
            await eventually(lambda: emu.stats()["total_calls"] >= 1)  # only the trial call is out
            assert not queued.done() and not gate_of(w).view.limiter.verified
            clock.advance(0.1)
            assert (await asyncio.wait_for(queued, 30)).status == 200
            assert gate_of(w).view.limiter.verified
            hanging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hanging
