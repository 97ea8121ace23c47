"""What the store's savepoints cost each database, kept in bounds.

SQLite keeps its savepoints' undo pages (statement journals) in memory: a transaction of many
savepoints, each changing many pages, opens no temporary file. Each unit of a group commit runs
in a savepoint, and each command of a worker's call in one more (``UnitRunner.write_each``).
SQLite journals the pages a savepoint changes; past 64 KiB that journal spills to a file (created
and unlinked at once, so only the open descriptor shows it) unless ``temp_store`` is memory. The
first test looks at its own process's descriptors from inside such a transaction, after three
savepoints that each rewrote ~400 KiB of pages (the third then fails, and is undone).

PostgreSQL makes each savepoint that writes a subtransaction: ``write_each`` keeps at most 64 of
them in one transaction (the second test).

Several operations first share one savepoint, and run again one savepoint each only when one of
them fails (the third test). A unit of work alone in its commit runs with no savepoint of its
own; a failing one is undone with the whole transaction, while units that share a commit keep a
savepoint each (the fourth test)."""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.postgres_backend import PostgresBackend
from charai.task_store.push import Offers, Outlet, pushed_response
from charai.task_store.sqlite_backend import SqliteBackend, SqliteTx
from charai.task_store.units import Unit, UnitRunner
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually
from tests.pg import PgDatabase

ROWS = 200
BLOB = 2000  # bytes: 200 rows fill ~100 pages of 4 KiB


def open_files() -> list[str]:
    """Paths of this process's open descriptors (the ones still there when read)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


def sqlite_temp_files(paths: list[str]) -> list[str]:
    # SQLite's unix VFS names its temporary files "etilqs_…" ("sqlite" backwards).
    return [p for p in paths if "etilqs_" in p]


async def test_a_transaction_of_large_savepoints_opens_no_temporary_file(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "tasks.db", checkpoint_interval=-1)
    await backend.open()
    try:
        units = UnitRunner(backend)

        async def fill(unit: Unit) -> None:
            await unit.tx.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            await unit.tx.executemany(
                "INSERT INTO scratch (k, v) VALUES (?, ?)", [(k, bytes(BLOB)) for k in range(ROWS)]
            )

        await units.write(fill)

        def rewrite(byte: int) -> Callable[[Unit], Coroutine[Any, Any, int]]:
            async def op(unit: Unit) -> int:
                return await unit.tx.execute("UPDATE scratch SET v = ?", bytes([byte]) * BLOB)

            return op

        async def rewrite_then_fail(unit: Unit) -> int:
            await rewrite(9)(unit)
            raise ValueError("refused after its writes")

        async def look(unit: Unit) -> list[str]:
            return open_files()

        answers = await units.write_each([rewrite(1), rewrite(2), rewrite_then_fail, look])
        assert answers[:2] == [ROWS, ROWS]
        assert isinstance(answers[2], ValueError)
        seen = answers[3]
        assert isinstance(seen, list) and any(p.endswith("tasks.db") for p in seen)  # the look works
        assert sqlite_temp_files(seen) == []
        # The failed operation's savepoint was undone from the in-memory journal, the others kept.
        kept = await backend.read(lambda tx: tx.fetch("SELECT DISTINCT v FROM scratch"))
        assert kept == [(bytes([2]) * BLOB,)]
    finally:
        await backend.close()


async def test_postgresql_runs_at_most_64_savepoints_per_transaction(postgres: PgDatabase) -> None:
    """PostgreSQL, by nature (a subtransaction per savepoint that writes; a backend caches 64 of
    their ids, and a transaction past that makes every snapshot meanwhile slower on the primary and
    its standbys): 150 operations of one ``write_each`` run as transactions of at most 64, in
    order, each answered as before, a failing one rolled back alone."""
    backend = PostgresBackend(postgres.url)
    await backend.open()
    try:
        units = UnitRunner(backend)

        async def make(unit: Unit) -> None:
            await unit.tx.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY, xact BIGINT NOT NULL)")

        await units.write(make)

        def insert(k: int) -> Callable[[Unit], Coroutine[Any, Any, int]]:
            async def op(unit: Unit) -> int:
                await unit.tx.execute("INSERT INTO scratch (k, xact) VALUES (?, txid_current())", k)
                if k == 100:
                    raise ValueError("refused after its write")
                return k

            return op

        answers = await units.write_each([insert(k) for k in range(150)])
        assert [a for k, a in enumerate(answers) if k != 100] == [k for k in range(150) if k != 100]
        assert isinstance(answers[100], ValueError)
        rows = await backend.read(lambda tx: tx.fetch("SELECT k, xact FROM scratch ORDER BY k"))
        assert [r[0] for r in rows] == [k for k in range(150) if k != 100]
        per_transaction = collections.Counter(r[1] for r in rows)
        assert len(per_transaction) == 3 and max(per_transaction.values()) <= 64
        # In order: each transaction holds a run of consecutive operations, and began after the last.
        firsts = [min(r[0] for r in rows if r[1] == x) for x in sorted(per_transaction)]
        assert firsts == [0, 64, 128]
    finally:
        await backend.close()


async def test_operations_share_one_savepoint_until_one_fails_then_run_one_savepoint_each(
    tmp_path: Path,
) -> None:
    """``write_each`` runs several operations in one savepoint. When one of them raises, that
    savepoint is undone, with the pushes it recorded (their slots go back to the offer), and every
    operation runs again in a savepoint of its own: the answers, the rows and the pushes sent are
    those of one savepoint each from the start."""
    backend = SqliteBackend(tmp_path / "tasks.db", checkpoint_interval=-1)
    await backend.open()
    try:
        units = UnitRunner(backend)
        runs: collections.Counter[int] = collections.Counter()
        statements: list[str] = []

        async def setup(unit: Unit) -> None:
            await unit.tx.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY)")
            assert isinstance(unit.tx, SqliteTx)
            conn: sqlite3.Connection = unit.tx._conn  # the database thread's connection
            conn.set_trace_callback(statements.append)

        await units.write(setup)

        def pushing(k: int, offers: Offers) -> Callable[[Unit], Coroutine[Any, Any, int]]:
            async def op(unit: Unit) -> int:
                runs[k] += 1
                await unit.tx.execute("INSERT INTO scratch (k) VALUES (?)", k)
                taken = offers.take(task_pb2.TASK_TYPE_TTS_GENERATION)
                assert taken is not None
                job = spb.Job(task_id=f"task_{k}", dispatch_gen=1)
                unit.pushed.append((taken[0], pushed_response(job, spb.ClaimTaskResponse())))
                return k

            return op

        async def failing(unit: Unit) -> int:
            runs[0] += 1
            await unit.tx.execute("INSERT INTO scratch (k) VALUES (99)")
            raise ValueError("refused after its write")

        def offered() -> tuple[Offers, asyncio.Queue[object]]:
            offers, queue = Offers(30.0), asyncio.Queue[object]()
            outlet = Outlet(queue, asyncio.get_running_loop())
            offers.offer(
                outlet,
                spb.WorkerOffer(worker_id="w1", types=[task_pb2.TASK_TYPE_TTS_GENERATION], slots=3),
            )
            return offers, queue

        # All succeed: one savepoint for the three, each operation run once.
        offers, queue = offered()
        units.offers = offers
        statements.clear()
        assert await units.write_each([pushing(k, offers) for k in (1, 2, 3)]) == [1, 2, 3]
        assert statements.count("SAVEPOINT each") == 1
        assert runs == {1: 1, 2: 1, 3: 1}
        assert (offers.slots, offers.pushed, queue.qsize()) == (0, 3, 3)

        # The second fails: the first ran in the shared savepoint, then all three one by one.
        offers, queue = offered()
        units.offers = offers
        statements.clear()
        runs.clear()
        answers = await units.write_each([pushing(4, offers), failing, pushing(5, offers)])
        assert answers[0] == 4 and isinstance(answers[1], ValueError) and answers[2] == 5
        assert statements.count("SAVEPOINT each") == 1 + 3
        assert runs == {4: 2, 0: 2, 5: 1}
        # Only the pushes of the operations that committed were sent; the others' slots are back.
        assert (offers.slots, offers.pushed, queue.qsize()) == (1, 2, 2)
        rows = await backend.read(lambda tx: tx.fetch("SELECT k FROM scratch ORDER BY k"))
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    finally:
        await backend.close()


async def test_a_unit_alone_in_its_commit_runs_without_a_savepoint_of_its_own(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "tasks.db", checkpoint_interval=-1)
    await backend.open()
    try:
        statements: list[str] = []

        async def setup(tx: Any) -> None:
            await tx.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY)")
            tx._conn.set_trace_callback(statements.append)  # the database thread's connection

        await backend.write(setup)

        def insert(k: int, fail: bool = False) -> Callable[[Any], Coroutine[Any, Any, int]]:
            async def body(tx: Any) -> int:
                await tx.execute("INSERT INTO scratch (k) VALUES (?)", k)
                if fail:
                    raise ValueError(f"refused after writing {k}")
                return k

            return body

        committed: list[int] = []
        # Alone: no savepoint; its row commits.
        statements.clear()
        assert await backend.write(insert(1), on_commit=lambda: committed.append(1)) == 1
        assert statements == ["BEGIN IMMEDIATE", "INSERT INTO scratch (k) VALUES (1)", "COMMIT"]
        # Alone and failing after its write: the caller gets its error, the transaction is rolled
        # back (its row gone, no commit hook), and the next unit begins a transaction of its own.
        statements.clear()
        try:
            await backend.write(insert(2, fail=True), on_commit=lambda: committed.append(2))
        except ValueError as exc:
            assert "refused after writing 2" in str(exc)
        else:
            raise AssertionError("the failing unit's error did not reach its caller")
        assert statements == ["BEGIN IMMEDIATE", "INSERT INTO scratch (k) VALUES (2)", "ROLLBACK"]
        assert await backend.write(insert(3), on_commit=lambda: committed.append(3)) == 3

        # Two units in one commit: a savepoint each, the failing one undone alone. The database
        # thread is held inside a unit until both are queued behind it, so they form one batch.
        entered, gate = threading.Event(), threading.Event()

        async def hold(tx: Any) -> None:
            entered.set()
            assert gate.wait(30)

        holding = asyncio.ensure_future(backend.write(hold))
        assert await asyncio.to_thread(entered.wait, 30)
        good = asyncio.ensure_future(backend.write(insert(4), on_commit=lambda: committed.append(4)))
        bad = asyncio.ensure_future(
            backend.write(insert(5, fail=True), on_commit=lambda: committed.append(5))
        )
        await eventually(lambda: backend._queue.qsize() == 2)
        statements.clear()
        gate.set()
        await holding
        assert await good == 4
        try:
            await bad
        except ValueError:
            pass
        else:
            raise AssertionError("the failing unit's error did not reach its caller")
        assert statements.count("SAVEPOINT unit") == 2 and "ROLLBACK TO unit" in statements
        assert statements[-1] == "COMMIT"
        rows = await backend.read(lambda tx: tx.fetch("SELECT k FROM scratch ORDER BY k"))
        assert [r[0] for r in rows] == [1, 3, 4]
        assert committed == [1, 3, 4]
    finally:
        await backend.close()
