"""The fair-share rules (charai.core.domain.fairshare) on their own: which held task goes next.

Examples first (weights, priority, aging, a newcomer's turn), then properties over random
tenants, weights, arrivals and priorities (hypothesis): shares follow weights over any window,
a tenant's own tasks go in rank order, a low task is released in bounded time while high ones
keep arriving, a new tenant gets the next turn, the store's batched plan equals one-by-one turns,
and a task's computed place matches when it is really released.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import TypeVar

import pytest
from charai.core.domain import fairshare
from charai.core.domain.fairshare import FairQueue, Turn
from hypothesis import given, settings
from hypothesis import strategies as st

T = TypeVar("T")
S = 1_000_000  # one second in microseconds
AGING = 60 * S
HIGH, NORMAL, LOW = 0, 1, 2  # urgency: steps below the highest priority


def weights(table: dict[str, int]) -> Callable[[str], int]:
    return lambda tenant: table.get(tenant, 1)


def drain(queue: FairQueue[T], n: int | None = None) -> list[tuple[str, T]]:
    out: list[tuple[str, T]] = []
    while n is None or len(out) < n:
        got = queue.pop()
        if got is None:
            break
        out.append(got)
    return out


# -- examples ------------------------------------------------------------------------------------
def test_equal_tenants_alternate_whatever_they_queued() -> None:
    q: FairQueue[str] = FairQueue(weights({}), AGING)
    for i in range(1000):
        q.push("a", f"a{i}", NORMAL, i)
    for i in range(5):
        q.push("b", f"b{i}", NORMAL, 2000 + i)
    first = [tenant for tenant, _ in drain(q, 10)]
    assert first == ["a", "b"] * 5
    assert [tenant for tenant, _ in drain(q)] == ["a"] * 995


def test_a_weight_3_tenant_gets_three_turns_for_each_of_a_weight_1_tenant() -> None:
    q: FairQueue[str] = FairQueue(weights({"big": 3}), AGING)
    for i in range(100):
        q.push("big", f"big{i}", NORMAL, i)
        q.push("small", f"small{i}", NORMAL, i)
    order = [tenant for tenant, _ in drain(q, 40)]
    assert collections.Counter(order) == {"big": 30, "small": 10}
    # ...spread out, not in a block: every window of 4 turns has 3 of one and 1 of the other.
    for start in range(0, 40, 4):
        assert collections.Counter(order[start : start + 4]) == {"big": 3, "small": 1}, order


def test_a_newcomer_takes_the_next_turn_and_rejoining_saves_no_credit() -> None:
    q: FairQueue[str] = FairQueue(weights({}), AGING)
    for i in range(100):
        q.push("a", f"a{i}", NORMAL, i)
    drain(q, 50)
    q.push("b", "b0", NORMAL, 500)
    assert q.pop() == ("b", "b0")
    # b is idle for 20 of a's turns: coming back, it is level with a, not 20 turns ahead.
    drain(q, 20)
    for i in range(1, 30):
        q.push("b", f"b{i}", NORMAL, 600 + i)
    assert [tenant for tenant, _ in drain(q, 10)] == ["b", "a"] * 5


def test_priority_orders_a_tenants_tasks_and_aging_bounds_the_wait_of_low() -> None:
    q: FairQueue[str] = FairQueue(weights({}), AGING)
    q.push("a", "low", LOW, 0)
    q.push("a", "normal", NORMAL, 0)
    q.push("a", "high", HIGH, 0)
    assert [item for _, item in drain(q)] == ["high", "normal", "low"]
    # Created two agings after the low task, a high task goes after it.
    q.push("a", "old-low", LOW, 0)
    q.push("a", "late-high", HIGH, 2 * AGING + 1)
    q.push("a", "early-high", HIGH, 2 * AGING - 1)
    assert [item for _, item in drain(q)] == ["early-high", "old-low", "late-high"]


def test_bad_weights_and_priorities_are_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        fairshare.stride(0)
    with pytest.raises(ValueError, match="urgency"):
        fairshare.rank(3, 0, AGING)


# -- properties ----------------------------------------------------------------------------------
tenant_weights = st.dictionaries(
    st.sampled_from("abcdefgh"), st.integers(min_value=1, max_value=8), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None)
@given(table=tenant_weights, window=st.integers(min_value=1, max_value=400))
def test_shares_follow_the_weights_over_any_window(table: dict[str, int], window: int) -> None:
    """Every tenant always has work: over any run of consecutive turns each tenant's count is its
    weight's share of the run, off by at most 2 + (tenants x its share) turns."""
    q: FairQueue[int] = FairQueue(weights(table), AGING)
    total = sum(table.values())
    turns = 3 * total + window + 50
    for tenant in table:
        for i in range(turns):
            q.push(tenant, i, NORMAL, i)
    order = [tenant for tenant, _ in drain(q, turns)]
    n = len(table)
    for start in range(0, len(order) - window + 1, max(1, window // 3)):
        counts = collections.Counter(order[start : start + window])
        for tenant, weight in table.items():
            expected = window * weight / total
            assert abs(counts[tenant] - expected) <= 2 + n * weight / total, (tenant, counts, expected)


@settings(max_examples=150, deadline=None)
@given(
    tasks=st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from([HIGH, NORMAL, LOW]), st.integers(0, 300 * S)),
        min_size=1,
        max_size=60,
    )
)
def test_a_tenants_tasks_go_in_rank_order(tasks: list[tuple[str, int, int]]) -> None:
    q: FairQueue[int] = FairQueue(weights({"a": 2}), AGING)
    rank_of = {}
    for n, (tenant, urgency, created) in enumerate(tasks):
        q.push(tenant, n, urgency, created)
        rank_of[n] = (fairshare.rank(urgency, created, AGING), n)
    released = drain(q)
    assert sorted(item for _, item in released) == list(range(len(tasks)))
    for tenant in "abc":
        mine = [rank_of[item] for t, item in released if t == tenant]
        assert mine == sorted(mine)


@settings(max_examples=100, deadline=None)
@given(
    others=st.integers(min_value=0, max_value=5),
    backlog=st.integers(min_value=0, max_value=30),
    step=st.integers(min_value=AGING // 200, max_value=20 * S),
)
def test_low_is_released_while_high_keeps_arriving(others: int, backlog: int, step: int) -> None:
    """A tenant queues a low task behind ``backlog`` high ones, then a new high task arrives
    every ``step`` (one per turn, while other tenants keep queueing work too): the low task is
    released, and before any high task created more than two agings after it."""
    q: FairQueue[str] = FairQueue(weights({}), AGING)
    for i in range(backlog):
        q.push("t", f"early-{i}", HIGH, i)
    q.push("t", "low", LOW, backlog)
    now = backlog
    released_high: list[int] = []
    # Tenant t gets every (others + 1)-th turn, and the low task waits for at most the high tasks
    # created within two agings of it, and the backlog.
    limit = (others + 1) * (2 * AGING // step + backlog + 2)
    for _ in range(limit):
        now += step
        q.push("t", f"high-{now}", HIGH, now)
        for o in range(others):
            q.push(f"o{o}", f"o{o}-{now}", NORMAL, now)
        got = q.pop()
        assert got is not None
        _, item = got
        if item == "low":
            break
        if item.startswith("high-"):
            released_high.append(int(item.split("-")[1]))
    else:
        pytest.fail(f"the low task was not released within {limit} turns")
    assert all(created <= backlog + 2 * AGING for created in released_high)


@settings(max_examples=150, deadline=None)
@given(table=tenant_weights, served=st.integers(min_value=0, max_value=200))
def test_a_new_tenant_gets_the_next_turn(table: dict[str, int], served: int) -> None:
    q: FairQueue[int] = FairQueue(weights(table), AGING)
    for tenant in table:
        for i in range(500):
            q.push(tenant, i, NORMAL, i)
    drain(q, len(table) + served)  # every waiting tenant was served at least once
    q.push("newcomer", 0, LOW, 10_000)
    assert q.pop() == ("newcomer", 0)


turn_states = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 20), st.integers(1, 6), st.integers(1, 5)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(states=turn_states, budget=st.integers(min_value=1, max_value=40))
def test_a_plan_from_the_first_candidates_equals_turns_taken_one_by_one(
    states: list[tuple[int, int, int, int]], budget: int
) -> None:
    """The store reads only the ``budget`` first tenants in turn order and plans ``budget``
    turns at once; that is the same as taking turns one at a time over every tenant."""
    table = {f"t{i}": w for i, (_, _, _, w) in enumerate(states)}
    turns = [Turn(f"t{i}", due * 1000, served, held) for i, (due, served, held, _) in enumerate(states)]
    candidates = sorted(turns, key=lambda t: t.key)[:budget]
    batch = fairshare.plan(candidates, budget, weights(table), 0, 100)
    one_by_one: list[str] = []
    current = {t.tenant: t for t in turns}
    vtime, count = 0, 100
    for _ in range(budget):
        waiting = [t for t in current.values() if t.held > 0]
        if not waiting:
            break
        step = fairshare.plan(waiting, 1, weights(table), vtime, count)
        one_by_one += step.order
        current.update(step.after)
        vtime, count = step.vtime, step.turns
    assert list(batch.order) == one_by_one
    assert (batch.vtime, batch.turns) == (vtime, count)
    assert {name: current[name] for name in batch.after} == batch.after


@settings(max_examples=100, deadline=None)
@given(
    table=tenant_weights,
    counts=st.lists(st.integers(min_value=1, max_value=12), min_size=8, max_size=8),
    pre=st.integers(min_value=0, max_value=20),
)
def test_a_held_tasks_place_is_when_it_is_released_up_to_ties(
    table: dict[str, int], counts: list[int], pre: int
) -> None:
    """place() is 1 + the turns before the task's own (ties at its virtual time aside): the task
    is released at that place or after at most one tied turn per other tenant."""
    q: FairQueue[tuple[str, int]] = FairQueue(weights(table), AGING)
    seq = itertools.count()
    pushed: list[tuple[str, int]] = []
    for tenant, n in zip(table, counts, strict=False):
        for _ in range(n + pre):
            item = (tenant, next(seq))
            q.push(tenant, item, NORMAL, next(seq))
            pushed.append(item)
    gone = {item for _, item in drain(q, pre)}
    places = {item: q.place(item[0], item) for item in pushed if item not in gone}
    released = [item for _, item in drain(q)]
    ties = len(table) - 1
    for index, item in enumerate(released, start=1):
        assert places[item] <= index <= places[item] + ties, (item, places[item], index)
