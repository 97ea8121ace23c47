"""Queue positions: a queued task's place in the order tasks of its type will start in, read in
SQL from the fair-share backlog (:mod:`charai.task_store.backlog`), so any replica answers the
same. :func:`place` places one task (a create's answer, GetTask); :func:`place_page` a page of
them together (ListTasks).
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

from charai.core.domain import fairshare
from charai.core.domain.states import Status
from charai.core.timestamps import micros
from charai.task_store.backend import Tx
from charai.task_store.backlog import MAX_BUFFER
from charai.tasks.v1 import task_pb2

#: How many tasks queued behind a held task its place counts before it counts those ahead.
BEHIND_SCAN = 256
#: A held task's place counts the turns of at most this many tenants due before it (the first
#: in turn order): exact up to there, a lower bound beyond, so reading it costs the same with
#: 10,000 tenants waiting.
PLACE_SCAN = 1000
#: A page's held tasks of one tenant are placed together when at most this many of the tenant's
#: held tasks lie between the first and the last of them (their keys are read), else one by one.
PAGE_SPAN = 20_000
#: The queued tasks not held: the buffer and the retries waiting for their time (the partial
#: index ``tasks_released``).
_RELEASED = f"status = {int(Status.QUEUED)} AND held = 0"
#: The released jobs of a type (?) that a held task of a priority (?) waits behind, counted up
#: to a limit (?): the workers take them before it.
_RELEASED_AT_OR_ABOVE = (
    f"SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE type = ? AND {_RELEASED}"
    " AND priority >= ? LIMIT ?) AS b"
)


async def place(tx: Tx, task: task_pb2.Task, in_backlog: bool | None = None) -> None:
    """Fills a queued task's ``queue_position``: its place in the order tasks of its type
    will start in (1 = next).

    Released (its job published, or waiting for a retry): 1 + the released tasks of its type
    that workers take before it (higher priority, or the same and created earlier; a retry
    keeps its place by creation). Held: 1 + the released tasks of its priority or higher (the
    workers take them first; once released, it goes ahead of lower ones) + the tasks of its
    own tenant ranked before it + the other tenants' turns due before its own
    (:func:`fairshare.place`, in one aggregate over the first :data:`PLACE_SCAN` of those
    tenants). Later creates of other tenants may still take turns before it.

    ``in_backlog``: False when the caller knows the task is released (a create that did not
    hold it), which spares the look-up in the backlog; None to look.
    """
    row = None
    if in_backlog is not False:
        row = await tx.fetchrow(
            "SELECT b.tenant, b.rank, f.due, f.held, f.stride FROM backlog b"
            " JOIN fair_tenants f ON f.type = b.type AND f.tenant = b.tenant WHERE b.task_id = ?",
            task.id,
        )
    kind = int(task.type)
    if row is None:
        task.queue_position = 1 + await _released_ahead(tx, task)
        return
    tenant, rank, due, held, step = str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])
    ahead = await _tenant_ahead(tx, kind, tenant, rank, task.id, held)
    target = due + ahead * step
    totals = await tx.fetchrow(
        "SELECT (SELECT COALESCE(SUM(CASE WHEN o.held < o.n THEN o.held ELSE o.n END), 0) FROM"
        " (SELECT held, (? - due + stride - 1) / stride AS n FROM fair_tenants"
        " WHERE type = ? AND held > 0 AND due < ? AND tenant <> ? ORDER BY due LIMIT ?) AS o),"
        f" ({_RELEASED_AT_OR_ABOVE})",
        target,
        kind,
        target,
        tenant,
        PLACE_SCAN,
        kind,
        int(task.priority),
        MAX_BUFFER,
    )
    assert totals is not None
    task.queue_position = 1 + ahead + int(totals[0]) + int(totals[1])


async def place_page(tx: Tx, tasks: Sequence[task_pb2.Task]) -> None:
    """Fills ``queue_position`` for every task of a page (0 unless queued), as :func:`place`
    does for each, with a few queries per task type and tenant on the page instead of up to
    four per task: a ListTasks page of 500 of a tenant's 5,000 queued tasks held the database
    thread for 101 ms that way (BENCHMARKS.md, thirtieth pass).

    One look-up finds the page's held tasks; for each task type and tenant among them, the
    tenant's backlog keys from the first of them to the last (:data:`PAGE_SPAN` at most, else
    each is placed alone), one count of those behind the last (or ahead of the first) and
    the other tenants' turns due before the last one's turn; for each task type and priority,
    one count of the released jobs. The page's released tasks of a type (the buffer and the
    retries waiting) are placed from one read of every released task's key of that type
    (:data:`PAGE_SPAN` at most, else each alone).
    """
    queued = []
    for task in tasks:
        if task.status == task_pb2.TASK_STATUS_QUEUED:
            queued.append(task)
        else:
            task.queue_position = 0
    if not queued:
        return
    by_id = {task.id: task for task in queued}
    marks = ", ".join("?" * len(by_id))
    found = await tx.fetch(
        "SELECT b.task_id, b.tenant, b.rank, f.due, f.held, f.stride FROM backlog b"
        f" JOIN fair_tenants f ON f.type = b.type AND f.tenant = b.tenant WHERE b.task_id IN ({marks})",
        *by_id,
    )
    groups: dict[tuple[int, str], list[tuple[int, str]]] = collections.defaultdict(list)
    turns: dict[tuple[int, str], tuple[int, int, int]] = {}
    for row in found:
        task_id, tenant = str(row[0]), str(row[1])
        kind = int(by_id[task_id].type)
        groups[kind, tenant].append((int(row[2]), task_id))
        turns[kind, tenant] = (int(row[3]), int(row[4]), int(row[5]))
    held_ids = {task_id for keys in groups.values() for _, task_id in keys}
    released_by_type: dict[int, list[task_pb2.Task]] = collections.defaultdict(list)
    for task in queued:
        if task.id not in held_ids:
            released_by_type[int(task.type)].append(task)
    for kind, mine in released_by_type.items():
        places = await _released_aheads(tx, kind, mine) if len(mine) > 1 else None
        for task in mine:
            ahead = places[task.id] if places is not None else await _released_ahead(tx, task)
            task.queue_position = 1 + ahead
    released: dict[tuple[int, int], int] = {}
    for (kind, tenant), keys in groups.items():
        due, held, step = turns[kind, tenant]
        aheads = await _tenant_aheads(tx, kind, tenant, sorted(keys), held)
        if aheads is None:  # the page's tasks are far apart in the tenant's backlog
            for _, task_id in keys:
                await place(tx, by_id[task_id], True)
            continue
        targets = {task_id: due + ahead * step for task_id, ahead in aheads.items()}
        others = await tx.fetch(
            "SELECT held, due, stride FROM fair_tenants WHERE type = ? AND held > 0 AND due < ?"
            " AND tenant <> ? ORDER BY due LIMIT ?",
            kind,
            max(targets.values()),
            tenant,
            PLACE_SCAN,
        )
        for task_id, target in targets.items():
            task = by_id[task_id]
            others_first = 0
            for other_held, other_due, other_step in others:
                if other_due >= target:
                    break  # ordered by due: the rest are due later
                others_first += fairshare.turns_due_before(
                    int(other_held), int(other_due), int(other_step), target
                )
            priority = int(task.priority)
            if (kind, priority) not in released:
                released[kind, priority] = int(
                    await tx.fetchval(_RELEASED_AT_OR_ABOVE, kind, priority, MAX_BUFFER)
                )
            task.queue_position = 1 + aheads[task_id] + others_first + released[kind, priority]


async def _tenant_aheads(
    tx: Tx, kind: int, tenant: str, keys: list[tuple[int, str]], held: int
) -> dict[str, int] | None:
    """The tenant's held tasks ranked before each of ``keys`` (its sorted backlog keys), as
    :func:`_tenant_ahead` counts them one at a time; None when more than :data:`PAGE_SPAN`
    of the tenant's tasks lie between the first and the last."""
    (first_rank, first_id), (last_rank, last_id) = keys[0], keys[-1]
    span = await tx.fetch(
        "SELECT rank, task_id FROM backlog WHERE type = ? AND tenant = ?"
        " AND (rank, task_id) >= (?, ?) AND (rank, task_id) <= (?, ?) ORDER BY rank, task_id LIMIT ?",
        kind,
        tenant,
        first_rank,
        first_id,
        last_rank,
        last_id,
        PAGE_SPAN + 1,
    )
    if len(span) > PAGE_SPAN:
        return None
    index = {str(row[1]): i for i, row in enumerate(span)}
    if any(task_id not in index for _, task_id in keys):
        return None  # the database orders the keys otherwise than Python sorted them: one by one
    behind_last = await _count_behind(tx, kind, tenant, last_rank, last_id)
    if behind_last < BEHIND_SCAN:  # as _tenant_ahead: the count less those behind
        return {
            task_id: max(0, held - 1 - (behind_last + len(span) - 1 - index[task_id])) for _, task_id in keys
        }
    ahead_first = await _count_ahead(tx, kind, tenant, first_rank, first_id)
    return {task_id: ahead_first + index[task_id] for _, task_id in keys}


async def _tenant_ahead(tx: Tx, kind: int, tenant: str, rank: int, task_id: str, held: int) -> int:
    """The tenant's held tasks ranked before this one: its count minus those behind (few,
    for a task just created), or counted from the front when many are behind."""
    behind = await _count_behind(tx, kind, tenant, rank, task_id)
    if behind < BEHIND_SCAN:
        return max(0, held - 1 - behind)
    return await _count_ahead(tx, kind, tenant, rank, task_id)


async def _count_behind(tx: Tx, kind: int, tenant: str, rank: int, task_id: str) -> int:
    """The tenant's held tasks of ``kind`` ranked after ``(rank, task_id)``, at most
    :data:`BEHIND_SCAN`."""
    behind = await tx.fetchval(
        "SELECT COUNT(*) FROM (SELECT 1 FROM backlog WHERE type = ? AND tenant = ?"
        " AND (rank, task_id) > (?, ?) LIMIT ?) AS x",
        kind,
        tenant,
        rank,
        task_id,
        BEHIND_SCAN,
    )
    return int(behind)


async def _count_ahead(tx: Tx, kind: int, tenant: str, rank: int, task_id: str) -> int:
    """The tenant's held tasks of ``kind`` ranked before ``(rank, task_id)``."""
    ahead = await tx.fetchval(
        "SELECT COUNT(*) FROM backlog WHERE type = ? AND tenant = ? AND (rank, task_id) < (?, ?)",
        kind,
        tenant,
        rank,
        task_id,
    )
    return int(ahead)


async def _released_aheads(tx: Tx, kind: int, tasks: Sequence[task_pb2.Task]) -> dict[str, int] | None:
    """The released tasks of ``kind`` workers take before each of ``tasks``, as
    :func:`_released_ahead` counts them one at a time, from one read of every released task's
    key (priority, creation, id); None when there are more than :data:`PAGE_SPAN`."""
    found = await tx.fetch(
        f"SELECT priority, create_time, id FROM tasks WHERE type = ? AND {_RELEASED} LIMIT ?",
        kind,
        PAGE_SPAN + 1,
    )
    if len(found) > PAGE_SPAN:
        return None
    order = sorted((-int(row[0]), int(row[1]), str(row[2])) for row in found)
    return {
        task.id: bisect.bisect_left(order, (-int(task.priority), micros(task.create_time), task.id))
        for task in tasks
    }


async def _released_ahead(tx: Tx, task: task_pb2.Task) -> int:
    created = micros(task.create_time)
    ahead: Any = await tx.fetchval(
        f"SELECT COUNT(*) FROM tasks WHERE type = ? AND {_RELEASED} AND (priority > ? OR"
        " (priority = ? AND (create_time < ? OR (create_time = ? AND id < ?))))",
        int(task.type),
        int(task.priority),
        int(task.priority),
        created,
        created,
        task.id,
    )
    return int(ahead)
