"""SQLite backend: one connection on one dedicated thread, WAL, ``synchronous=FULL``.

SQLite has one writer anyway, so every unit of work runs on the database thread, one after the
other: sequences are assigned in commit order, and ``on_commit`` is called from that thread right
after each commit, in that same order (the event publisher relies on it).

The store's units of work are coroutines (so that the same code runs on asyncpg). Here every
:class:`SqliteTx` method is a plain call that completes without suspending, so the database
thread runs a whole unit with one ``coroutine.send(None)`` (:func:`run_to_completion`): one thread
hop per transaction, as when the logic was written against ``sqlite3`` directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from charai.task_store.backend import SQLITE, Body, Row
from charai.task_store.schema import MIGRATIONS, SCHEMA_VERSION_TABLE

T = TypeVar("T")


def run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends, synchronously, and returns its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a SQLite unit of work awaited something other than its transaction")


class SqliteTx:
    """:class:`~charai.task_store.backend.Tx` over a ``sqlite3`` connection (same thread)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return self._conn.execute(sql, args).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in self._conn.execute(sql, args).fetchall()]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        # fetchall, not fetchone: an INSERT/UPDATE … RETURNING finishes only when fully stepped.
        rows = self._conn.execute(sql, args).fetchall()
        return tuple(rows[0]) if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


class SqliteBackend:
    """:class:`~charai.task_store.backend.Backend` on a SQLite file."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def describe(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL may lose committed transactions on power loss; FULL does not.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(SCHEMA_VERSION_TABLE)
        done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have applied it while we waited for the write lock.
                if conn.execute(
                    "SELECT 1 FROM schema_version WHERE version = ?", (migration.version,)
                ).fetchone():
                    conn.execute("ROLLBACK")
                    continue
                for sql in migration.sqlite:
                    conn.execute(sql)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time_ns() // 1000),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._call(self._close_sync)
        self._pool.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the SQLite store is not open")
        return self._conn

    async def write(self, body: Body[T], on_commit: Callable[[], None] | None = None) -> T:
        return await self._call(self._write_sync, body, on_commit)

    def _write_sync(self, body: Body[T], on_commit: Callable[[], None] | None) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = run_to_completion(body(SqliteTx(conn)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if on_commit is not None:
            on_commit()
        return result

    async def read(self, body: Body[T]) -> T:
        return await self._call(self._read_sync, body)

    def _read_sync(self, body: Body[T]) -> T:
        # No other connection writes (one process owns the file), and this thread runs one unit
        # at a time, so a read sees one consistent state without a transaction.
        return run_to_completion(body(SqliteTx(self._connection())))
