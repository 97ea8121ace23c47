"""Fair share of a provider's capacity between tenants: which held task is released next.

task_store keeps queued tasks *held* (not yet handed to the workers) and releases them one by one
in the order decided here, so a tenant that queued 1,000 tasks and one that then queues 5 both
make progress at once. Pure: no I/O, no clock, no protobuf; the store persists the state below
and asks these functions (``charai.task_store.backlog``), and :class:`FairQueue` is the same rules
in memory, the reference the store's order is tested against.

**Between tenants: stride scheduling** (weighted round-robin with virtual time). Each tenant with
held work has a ``due`` virtual time; the next turn goes to the smallest ``due`` (ties: the tenant
served longest ago, then by name), and a turn moves that tenant's ``due`` on by its stride,
``STRIDE_SCALE // weight``: a weight-3 tenant gets three turns for every one of a weight-1 tenant.
The lane's virtual time (``vtime``) is the ``due`` of the last turn given. A tenant that starts
holding work again joins at ``max(due, vtime)``: never behind the others (no credit is saved up
while idle), and a new tenant is at least level with the front, so it gets the next turn (it was
never served, which wins the tie). Choosing the next tenant is one ordered-index probe in the
store (O(log n) in the tenants with held work), never a scan.

**Within a tenant: priority with aging.** A task's ``rank`` is its creation time plus
``aging`` per priority step below the highest: ``high`` goes before ``normal`` created up to one
``aging`` earlier, and so on; so a ``low`` task created at t is released before any ``high`` task
created after t + 2 x aging, and "high" never starves "low" for ever.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

#: Virtual time one turn costs a tenant of weight 1 (a weight-w tenant's stride is this // w;
#: weights go up to 1,000, so strides stay exact to a millionth).
STRIDE_SCALE = 1_000_000_000
#: Priority steps below the highest: 0 = high, 1 = normal, 2 = low.
URGENCY_LEVELS = 3
#: The most jobs of one task type released to workers and not yet claimed (the dispatch
#: buffer's cap, whatever its floor, the tasks running or the round of starts ask for).
MAX_BUFFER = 10_000


def stride(weight: int) -> int:
    """How far one turn moves a tenant of ``weight`` (>= 1) on in virtual time."""
    if weight < 1:
        raise ValueError("a tenant's weight must be >= 1")
    return STRIDE_SCALE // weight


def rank(urgency: int, created_us: int, aging_us: int) -> int:
    """A task's place within its tenant (smallest first): creation time, plus ``aging_us`` per
    priority step below the highest (``urgency`` 0 = high, 1 = normal, 2 = low)."""
    if not 0 <= urgency < URGENCY_LEVELS:
        raise ValueError(f"urgency must be 0 to {URGENCY_LEVELS - 1}")
    return created_us + urgency * aging_us


@dataclasses.dataclass(frozen=True, slots=True)
class Turn:
    """A tenant's place in the round of one lane (a task type)."""

    tenant: str
    #: Virtual time of the tenant's next turn.
    due: int = 0
    #: The lane's turn number when the tenant was last served (0: never).
    served: int = 0
    #: Tasks the tenant holds (waiting for a turn).
    held: int = 0

    @property
    def key(self) -> tuple[int, int, str]:
        """Turn order: smallest first."""
        return (self.due, self.served, self.tenant)


def joined(turn: Turn | None, tenant: str, vtime: int, count: int = 1) -> Turn:
    """``tenant`` holds ``count`` more tasks; one that held none joins the round at ``vtime`` or
    later (its own ``due`` when that is later: an idle spell saves up no turns)."""
    if turn is None:
        return Turn(tenant, vtime, 0, count)
    due = max(turn.due, vtime) if turn.held <= 0 else turn.due
    return dataclasses.replace(turn, due=due, held=max(0, turn.held) + count)


def served(turn: Turn, weight: int, turn_no: int) -> Turn:
    """``turn`` after the tenant got one turn (numbered ``turn_no``): one task fewer, ``due``
    one stride later."""
    return Turn(turn.tenant, turn.due + stride(weight), turn_no, turn.held - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The next releases of a lane: tenants in release order (one entry per task), each
    tenant's state afterwards, and the lane's virtual time and turn count afterwards."""

    order: tuple[str, ...]
    after: dict[str, Turn]
    vtime: int
    turns: int


def plan(
    candidates: Sequence[Turn], budget: int, weight: Callable[[str], int], vtime: int, turns: int
) -> Plan:
    """The next ``budget`` turns among ``candidates`` (tenants holding work).

    Exact when ``candidates`` are the ``budget`` first tenants in turn order (or all of them):
    every turn taken here goes to a candidate whose ``due`` is at most the first left-out
    tenant's, because at least ``budget - turns taken`` untouched candidates remain at or before
    it. So the store reads ``budget`` rows of one ordered index, however many tenants wait.
    """
    heap = [(t.key, t) for t in candidates if t.held > 0]
    heapq.heapify(heap)
    order: list[str] = []
    after: dict[str, Turn] = {}
    while heap and len(order) < budget:
        _, turn = heapq.heappop(heap)
        vtime = turn.due
        turns += 1
        turn = served(turn, weight(turn.tenant), turns)
        order.append(turn.tenant)
        after[turn.tenant] = turn
        if turn.held > 0:
            heapq.heappush(heap, (turn.key, turn))
    return Plan(tuple(order), after, vtime, turns)


def turns_before(turn: Turn, weight: int, due: int) -> int:
    """How many of ``turn``'s tasks are released before virtual time ``due`` (ties aside)."""
    return turns_due_before(turn.held, turn.due, stride(weight), due)


def turns_due_before(held: int, turn_due: int, step: int, due: int) -> int:
    """:func:`turns_before` from a tenant's held tasks, next turn and stride (as stored)."""
    if held <= 0 or turn_due >= due:
        return 0
    return min(held, (due - turn_due + step - 1) // step)


def place(me: Turn, weight: int, ahead: int, others: Iterable[tuple[Turn, int]]) -> int:
    """1-based place in release order of a held task with ``ahead`` tasks of its own tenant
    before it, among the other tenants' held tasks (``others``: each with its weight).

    Its turn comes at ``me.due + ahead`` strides; every other tenant's turns due before that are
    released first. Tenants due at exactly that time may go either side, so the place is exact
    up to those ties (a lower bound), and holds until other tasks arrive.
    """
    due = me.due + ahead * stride(weight)
    return 1 + ahead + sum(turns_before(t, w, due) for t, w in others if t.tenant != me.tenant)


class FairQueue(Generic[T]):
    """The fair order in memory: held tasks of many tenants, released one by one (:meth:`pop`)
    in the order the store releases them. O(log n) per operation (heaps with lazy entries).

    The reference model of the property tests; the store keeps the same state in tables.
    """

    def __init__(self, weight: Callable[[str], int], aging_us: int) -> None:
        self._weight = weight
        self._aging_us = aging_us
        self._turns: dict[str, Turn] = {}
        self._tasks: dict[str, list[tuple[int, int, T]]] = {}
        self._round: list[tuple[tuple[int, int, str], Turn]] = []
        self._seq = itertools.count()
        self.vtime = 0
        self.turn_count = 0

    def __len__(self) -> int:
        return sum(len(tasks) for tasks in self._tasks.values())

    def push(self, tenant: str, item: T, urgency: int, created_us: int) -> None:
        """Holds ``item`` of ``tenant``."""
        heapq.heappush(
            self._tasks.setdefault(tenant, []),
            (rank(urgency, created_us, self._aging_us), next(self._seq), item),
        )
        turn = joined(self._turns.get(tenant), tenant, self.vtime)
        self._turns[tenant] = turn
        if turn.held == 1:
            heapq.heappush(self._round, (turn.key, turn))

    def pop(self) -> tuple[str, T] | None:
        """Releases the next task: (tenant, item); None when nothing is held."""
        while self._round:
            key, turn = heapq.heappop(self._round)
            current = self._turns.get(turn.tenant)
            if current is None or current.key != key or current.held <= 0:
                continue  # a stale entry (the tenant was served or rejoined since)
            step = plan([current], 1, self._weight, self.vtime, self.turn_count)
            self.vtime, self.turn_count = step.vtime, step.turns
            after = step.after[turn.tenant]
            self._turns[turn.tenant] = after
            if after.held > 0:
                heapq.heappush(self._round, (after.key, after))
            _, _, item = heapq.heappop(self._tasks[turn.tenant])
            return turn.tenant, item
        return None

    def turn(self, tenant: str) -> Turn | None:
        return self._turns.get(tenant)

    def turns(self) -> list[Turn]:
        """Every tenant holding work."""
        return [t for t in self._turns.values() if t.held > 0]

    def place(self, tenant: str, item: T) -> int:
        """``item``'s place in release order now (see :func:`place`)."""
        mine = sorted(self._tasks[tenant])
        ahead = next(i for i, entry in enumerate(mine) if entry[2] == item)
        me = self._turns[tenant]
        others = [(t, self._weight(t.tenant)) for t in self.turns()]
        return place(me, self._weight(tenant), ahead, others)
