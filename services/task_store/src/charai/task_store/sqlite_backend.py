"""SQLite backend: one connection on one dedicated thread, WAL, ``synchronous=FULL``, statement
journals (the savepoints' undo pages) in memory.

SQLite has one writer anyway, so every unit of work runs on the database thread, one after the
other: sequences are assigned in commit order, and ``on_commit`` is called from that thread right
after the commit, in that same order (the event publisher relies on it). ``on_sealed`` is called
from that thread as soon as a unit's work is done, before the COMMIT: whatever it starts
can only reach this thread's queue, so it is decided after the commit. Writes queued together
share one commit (group commit, see :class:`SqliteBackend`).

The store's units of work are coroutines (so that the same code runs on asyncpg). Here every
:class:`SqliteTx` method is a plain call that completes without suspending, so the database
thread runs a whole unit with one ``coroutine.send(None)`` (:func:`run_to_completion`): one thread
hop per transaction, as when the logic was written against ``sqlite3`` directly.

Reads that may take long (the queue statistics and usage reports, aggregates over recent
history) run on a connection and thread of their own instead (:class:`AsideReader`): on the
database thread, one of them held up every write queued behind it for as long as it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
from charai.task_store.backend import SQLITE, Body, Hook, Row
from charai.task_store.schema import MIGRATIONS, SCHEMA_VERSION_TABLE
from charai.task_store.sqlite_checkpoint import BACKSTOP_PAGES, INTERVAL, Checkpointer

T = TypeVar("T")
log = structlog.get_logger("sqlite")


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

    async def insert(self, sql: str, key: str, *args: Any) -> int:
        # ``key`` is the table's INTEGER PRIMARY KEY, the rowid itself.
        rowid = self._conn.execute(sql, args).lastrowid
        assert rowid is not None, sql
        return rowid


@dataclasses.dataclass(slots=True)
class _Job:
    """One unit of work waiting for the database thread."""

    body: Body[Any]
    on_commit: Hook
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    on_sealed: Hook = None


#: A unit of work that ran: its job, its result, or the error it raised.
_Outcome = tuple[_Job, Any, BaseException | None]


def _sealed(on_sealed: Callable[[], None]) -> None:
    """Calls a unit's ``on_sealed``; a failure is logged, not raised: the unit commits all the
    same (a job whose hand-off failed is published by a relay's claim once the short hand-off
    claim expires)."""
    try:
        on_sealed()
    except Exception as exc:
        log.warning("on_sealed_failed", error=str(exc))


def _settle(outcomes: list[_Outcome]) -> None:
    """On the callers' event loop: answers each of them."""
    for job, result, error in outcomes:
        if job.future.done():
            continue  # the caller gave up (cancelled); the work is done all the same
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


class AsideReader:
    """Long reads beside the write path: a connection (made on the first read) and a thread of
    their own, one read at a time, each in one read transaction (one consistent snapshot of what
    was committed when it began: WAL lets it read while the writer commits).

    Why: GetQueueStats' read scans the recent event log and the last minute's completions. On a
    store with 20,000 tasks done in its last minutes it took 55-90 ms, and on the database thread
    every create, claim and report queued behind it waited that long (``python -m
    bench.store_inproc --stats-every 100``: a create's p99.9 69-97 ms; 5-7 ms with the reads
    here, 3-8 ms with no reads at all; BENCHMARKS.md, twenty-ninth pass). sqlite3 lets go of the
    GIL while SQLite steps a statement, so the writer runs meanwhile.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Reads run (tests).
        self.reads = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="sqlite-aside", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        """Ends the thread after the reads queued before; closes its connection."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA query_only=ON")  # reads only, whatever a body tries
        conn.execute("PRAGMA temp_store=MEMORY")  # sorts and groupings of the aggregates
        return conn

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while (job := self._queue.get()) is not None:
                try:
                    if conn is None:
                        conn = self._connect()
                    conn.execute("BEGIN")
                    try:
                        outcome: _Outcome = (job, run_to_completion(job.body(SqliteTx(conn))), None)
                    finally:
                        conn.execute("COMMIT")
                except BaseException as exc:
                    outcome = (job, None, exc)
                self.reads += 1
                SqliteBackend._answer([outcome])
        finally:
            if conn is not None:
                conn.close()


class SqliteBackend:
    """:class:`~charai.task_store.backend.Backend` on a SQLite file.

    Group commit: the database thread takes every unit of work queued at that moment and runs the
    writes in ONE transaction, each inside its own savepoint (a unit that fails rolls back alone;
    a unit alone in its batch needs none, and its failure rolls the transaction back), then
    commits once (one fsync for the batch) and answers every caller. Nobody is answered
    before the commit, so "acknowledged means on disk" holds exactly as with a commit per unit;
    under load the fsync cost is shared instead of paid in a queue.
    """

    dialect = SQLITE
    retryable: tuple[type[BaseException], ...] = ()  # one writer: no deadlock, nothing to run again
    busy: tuple[type[BaseException], ...] = ()  # and no lock wait to cut short
    #: Units of work per group commit at most (bounds the latency a batch adds).
    max_batch = 256

    def __init__(self, path: Path, checkpoint_interval: float = INTERVAL) -> None:
        self.path = path
        #: Copies the log into the database file beside the write path (None: SQLite's own,
        #: inside a commit, only; ``checkpoint_interval`` < 0).
        self.checkpointer = Checkpointer(path, checkpoint_interval) if checkpoint_interval >= 0 else None
        #: Runs :meth:`read_aside`.
        self.aside = AsideReader(path)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        #: Number of commits and of write units committed (for tests and metrics).
        self.commits = 0
        self.committed_units = 0

    def describe(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="sqlite", daemon=True)
        self._thread.start()
        await self._submit(self._open_body, write=False)
        self.aside.start()

    async def _open_body(self, tx: Any) -> None:
        self._open_sync()

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL may lose committed transactions on power loss; FULL does not.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            # Every unit sharing a commit runs in a savepoint, the commands of an Exchange call in
            # one more (UnitRunner.write_each; one each should one fail); SQLite keeps the pages a
            # savepoint changes in a statement journal, which spills to a temporary file past
            # 64 KiB unless temporary storage is in memory. On disk that was a file created,
            # unlinked and written page by page (~120 pwrite calls per task under B2's load, 3x
            # the log's own writes) in most transactions. The journal lives until the commit and
            # never needs to survive a crash (the write-ahead log does that), so memory loses
            # nothing.
            conn.execute("PRAGMA temp_store=MEMORY")
            self._migrate(conn)
            if self.checkpointer is not None:
                conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
                self.checkpointer.start()
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
        if self._thread is None:
            return
        await self._submit(self._close_body, write=False)
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    async def _close_body(self, tx: Any) -> None:
        self.aside.stop()  # after the reads it has; its connection is not the last to close
        if self.checkpointer is not None:
            self.checkpointer.stop()  # first: the last connection to close checkpoints the rest
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the SQLite store is not open")
        return self._conn

    async def _submit(
        self,
        body: Body[T],
        *,
        write: bool,
        on_commit: Hook = None,
        on_sealed: Hook = None,
    ) -> T:
        if self._thread is None:
            raise RuntimeError("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(body, on_commit, write, future, loop, on_sealed))
        return await future

    async def write(self, body: Body[T], on_commit: Hook = None, on_sealed: Hook = None) -> T:
        return await self._submit(body, write=True, on_commit=on_commit, on_sealed=on_sealed)

    async def read(self, body: Body[T]) -> T:
        # No other connection writes (one process owns the file), and the database thread runs
        # reads between group commits, so a read sees one consistent, committed state.
        return await self._submit(body, write=False)

    async def read_aside(self, body: Body[T]) -> T:
        if self._thread is None or self._closed:
            raise RuntimeError("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.aside.submit(_Job(body, None, False, future, loop))
        return await future

    # -- the database thread -------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(job)
            # Reads are answered before the writes' commit (they do not wait for its fsync).
            reads = [self._run_read(job) for job in batch if not job.write]
            if reads:
                self._answer(reads)
            writes = [job for job in batch if job.write]
            if writes:
                self._answer(self._run_writes(writes))

    @staticmethod
    def _answer(outcomes: list[_Outcome]) -> None:
        """Settles the callers' futures: one wake-up of each event loop per batch (not one per
        unit of work), in the order the units ran."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_settle, settled)

    def _run_read(self, job: _Job) -> _Outcome:
        try:
            conn = self._conn
            result = run_to_completion(job.body(SqliteTx(conn) if conn is not None else None))  # type: ignore[arg-type]
        except BaseException as exc:
            return job, None, exc
        return job, result, None

    def _run_writes(self, writes: list[_Job]) -> list[_Outcome]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            return [(job, None, exc) for job in writes]
        outcomes: list[_Outcome] = []
        # A unit alone in its commit (an idle store's every command) needs no savepoint of its
        # own: if it fails, the whole transaction is rolled back instead, to the same effect.
        lone = len(writes) == 1
        for job in writes:
            try:
                if not lone:
                    conn.execute("SAVEPOINT unit")
                result = run_to_completion(job.body(SqliteTx(conn)))
                if not lone:
                    conn.execute("RELEASE unit")
            except BaseException as exc:
                if lone:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    return [(job, None, exc)]
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                outcomes.append((job, None, exc))
                continue
            outcomes.append((job, result, None))
            # Sealed: whatever this starts reaches this thread after the COMMIT below.
            if job.on_sealed is not None:
                _sealed(job.on_sealed)
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return [(job, None, exc) for job in writes]
        self.commits += 1
        if self.checkpointer is not None:
            self.checkpointer.committed()
        answers: list[_Outcome] = []
        for job, result, error in outcomes:
            if error is None:
                self.committed_units += 1
                if job.on_commit is not None:
                    try:
                        job.on_commit()
                    except Exception as exc:
                        answers.append((job, None, exc))
                        continue
            answers.append((job, result, error))
        return answers
