"""ProviderGate, the adaptive (AIMD) limit on a worker's calls in flight to one provider.

Pure asyncio, no HTTP: the calls are simulated by acquire / rejected / succeeded / release, in
the order ProviderHttp.request makes them (tests/integration/test_provider_backpressure.py does
the same over real HTTP against the emulator).
"""

from __future__ import annotations

import asyncio

import pytest
from charai.worker.gate import ProviderGate


async def hold(gate: ProviderGate, n: int) -> None:
    """Takes ``n`` slots that are free now (fails rather than wait)."""
    for _ in range(n):
        await asyncio.wait_for(gate.acquire(), 0.1)


def refuse(gate: ProviderGate) -> None:
    """One call in flight answered 429: it lowers the limit, then leaves its slot."""
    gate.rejected()
    gate.release()


def answer(gate: ProviderGate) -> None:
    gate.succeeded()
    gate.release()


async def started(gate: ProviderGate, n: int) -> list[asyncio.Task[None]]:
    """``n`` callers that want a slot, each queued (or admitted) before the next one starts."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(gate.acquire()))
        await asyncio.sleep(0)
    return tasks


async def test_no_limit_until_the_first_429() -> None:
    gate = ProviderGate()
    await hold(gate, 64)
    assert (gate.limit, gate.in_flight, gate.waiting) == (None, 64, 0)


async def test_a_429_lowers_the_limit_to_the_calls_in_flight_minus_one() -> None:
    gate = ProviderGate()
    await hold(gate, 10)
    gate.rejected()
    assert gate.limit == 9
    gate.release()
    assert gate.in_flight == 9
    [waiter] = await started(gate, 1)
    assert not waiter.done(), "a tenth call went out although the provider refused the tenth"
    answer(gate)
    await asyncio.wait_for(waiter, 0.1)
    assert gate.in_flight == 9


async def test_a_burst_of_429s_settles_at_the_calls_the_provider_accepted() -> None:
    """64 calls against a provider that admits 50: the 14 refusals of the burst bring the limit
    to 50, not to 63 (one cut per burst would refuse 13 more next round) nor below 50 (a
    multiplicative cut per 429 would leave the provider's capacity unused)."""
    gate = ProviderGate()
    await hold(gate, 64)
    for _ in range(14):
        refuse(gate)
    assert (gate.limit, gate.in_flight) == (50, 50)


async def test_a_429_never_raises_the_limit_and_the_floor_is_one() -> None:
    gate = ProviderGate()
    await hold(gate, 8)
    for _ in range(5):
        refuse(gate)  # limit 7, 6, 5, 4, 3 with 3 left in flight
    assert gate.limit == 3
    gate.rejected()  # 3 in flight: 2
    gate.rejected()  # a second 429 while the same 3 are in flight: 2 again, not 1
    assert gate.limit == 2
    for _ in range(3):
        gate.release()
    await hold(gate, 1)
    refuse(gate)
    assert gate.limit == 1


async def test_the_limit_grows_by_one_after_limit_many_successes() -> None:
    gate = ProviderGate()
    await hold(gate, 5)
    refuse(gate)  # limit 4, 4 in flight
    for _ in range(3):
        answer(gate)
        await hold(gate, 1)
    assert gate.limit == 4
    answer(gate)
    assert gate.limit == 5
    await hold(gate, 2)  # 5 in flight again: the new slot is usable
    for _ in range(4):
        answer(gate)
        await hold(gate, 1)
    refuse(gate)  # a 429 breaks the run: the count starts over
    assert gate.limit == 4
    for _ in range(3):
        answer(gate)
        await hold(gate, 1)
    assert gate.limit == 4


async def test_successes_in_a_lull_do_not_grow_the_limit() -> None:
    """Below the limit with nobody waiting, a success says nothing about the provider: the limit
    learned in the last burst is kept for the next one."""
    gate = ProviderGate()
    await hold(gate, 6)
    refuse(gate)  # limit 5, 5 in flight
    for _ in range(4):
        answer(gate)  # 4, 3, 2, 1 in flight: the limit does not bind
    await hold(gate, 1)
    for _ in range(20):
        answer(gate)
        await hold(gate, 1)
    assert gate.limit == 5


async def test_only_the_calls_beyond_the_limit_wait_and_in_order() -> None:
    gate = ProviderGate()
    await hold(gate, 4)
    refuse(gate)  # limit 3, 3 in flight
    first, second = await started(gate, 2)
    assert (gate.waiting, first.done(), second.done()) == (2, False, False)
    answer(gate)
    await asyncio.sleep(0)
    assert (first.done(), second.done(), gate.waiting, gate.in_flight) == (True, False, 1, 3)
    answer(gate)
    await asyncio.wait_for(second, 0.1)
    assert (gate.waiting, gate.in_flight) == (0, 3)


async def test_growth_admits_a_waiting_call_at_once() -> None:
    gate = ProviderGate()
    await hold(gate, 2)
    refuse(gate)  # limit 1
    [waiter] = await started(gate, 1)
    gate.succeeded()  # one success at limit 1: limit 2, and the waiter goes now
    await asyncio.wait_for(waiter, 0.1)
    assert (gate.limit, gate.in_flight) == (2, 2)


async def test_the_ceiling_bounds_the_calls_and_the_growth() -> None:
    gate = ProviderGate(ceiling=2)
    await hold(gate, 2)
    [waiter] = await started(gate, 1)
    for _ in range(10):
        gate.succeeded()
    assert (gate.limit, waiter.done()) == (2, False)
    gate.release()
    await asyncio.wait_for(waiter, 0.1)
    with pytest.raises(ValueError, match="ceiling"):
        ProviderGate(ceiling=0)


async def test_a_cancelled_wait_leaves_no_slot_taken_or_queued() -> None:
    gate = ProviderGate(ceiling=1)
    await hold(gate, 1)
    cancelled, after = await started(gate, 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.waiting == 1
    gate.release()
    await asyncio.wait_for(after, 0.1)
    assert (gate.in_flight, gate.waiting) == (1, 0)


async def test_a_slot_handed_over_to_a_cancelled_wait_is_given_back() -> None:
    gate = ProviderGate(ceiling=1)
    await hold(gate, 1)
    [waiter] = await started(gate, 1)
    gate.release()  # hands the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (gate.in_flight, gate.waiting) == (0, 0)
    await hold(gate, 1)


async def test_a_rate_limit_reported_after_the_call_left_lowers_to_the_calls_in_flight() -> None:
    """answers.py calls rejected_after_release() for a 1302 inside a 200 answer: that call has
    already released its slot, so the calls still in flight are what the provider accepted."""
    gate = ProviderGate()
    await hold(gate, 6)
    answer(gate)
    gate.rejected_after_release()
    assert (gate.limit, gate.in_flight) == (5, 5)
    [waiter] = await started(gate, 1)
    assert not waiter.done(), "nothing closes, but the limit is reached"
    answer(gate)
    await asyncio.wait_for(waiter, 0.1)
