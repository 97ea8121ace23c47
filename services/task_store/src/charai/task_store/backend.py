"""The port between the task logic (:mod:`charai.task_store.store`) and a database.

The store's operations are written once, as ``async`` functions over a :class:`Tx`. A backend
runs them: :class:`~charai.task_store.sqlite_backend.SqliteBackend` on its one database thread,
:class:`~charai.task_store.postgres_backend.PostgresBackend` on a pooled asyncpg connection.

SQL is written with ``?`` placeholders (SQLite's style); PostgreSQL's backend numbers them
(``$1``, ``$2``, …) in one place, :func:`numbered`. What differs between the dialects beyond
placeholders is small and named in :class:`Dialect`, so the store's logic has no ``if postgres``
scattered through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Row = tuple[Any, ...]
#: One unit of work: a coroutine function over a transaction (or a read-only connection).
Body = Callable[["Tx"], Coroutine[Any, Any, T]]
#: Called around a write's commit (``Backend.write``'s ``on_commit`` and ``on_sealed``).
Hook = Callable[[], None] | None


class Tx(Protocol):
    """A transaction (writes) or a connection (reads). Placeholders are ``?``."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Runs one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def insert(self, sql: str, key: str, *args: Any) -> int:
        """Runs one ``INSERT`` of one row (no ``RETURNING``, no ``ON CONFLICT``: it inserts or
        raises) and returns the row's integer key column ``key``. SQLite reads the rowid that an
        ``INTEGER PRIMARY KEY`` is, which costs ~4 µs less per row than ``RETURNING``;
        PostgreSQL appends ``RETURNING key``."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Dialect:
    """The few things the two databases spell differently."""

    name: str
    #: Appended to a ``SELECT`` of a task row a transaction is about to change. SQLite needs
    #: nothing (``BEGIN IMMEDIATE`` already excludes every other writer); PostgreSQL locks the
    #: row, so two replicas cannot both claim or complete the same task.
    for_update: str
    #: Appended to a ``SELECT`` that picks rows to claim: replicas skip rows another is claiming
    #: instead of queueing behind it.
    skip_locked: str
    #: Inserts one event and writes its task row in one statement that first takes the events
    #: lock, returning the event's sequence (``None``: the portable INSERT then UPDATE, with no
    #: lock, for SQLite's single writer). On PostgreSQL the lock is transaction-scoped, so it is
    #: held until commit: sequence order is commit order (see the store). One statement, so the
    #: lock is held for one round trip and the COMMIT, not for three.
    append_event: str | None
    #: True: ``tasks.metadata`` is JSONB and filters use ``@>``; False: rows of ``task_metadata``.
    metadata_json: bool
    #: :attr:`append_event` for a task whose row the unit wrote already (an operation of
    #: ``UnitRunner.write_each`` before the next one ran): inserts the event under the events
    #: lock and sets only the row's ``last_seq`` (task id, tenant, task type, event type, time,
    #: task blob), returning the sequence. ``None`` with :attr:`append_event`.
    append_event_seq: str | None = None
    #: Bounds the lock waits of what follows in the transaction, so that an optional step can
    #: give way rather than wait (PostgreSQL: ``lock_timeout``, undone with its savepoint or by
    #: :attr:`any_lock_wait`; the step's error is one of ``Backend.busy``). ``None``: SQLite,
    #: where a transaction never waits for a lock (one writer).
    brief_lock_wait: str | None = None
    #: Lifts :attr:`brief_lock_wait` again.
    any_lock_wait: str | None = None
    #: Takes a transaction lock on a pair of int4 (class, key), held until commit (``None``:
    #: SQLite, whose single writer excludes every other writer anyway). Serializes the claims and
    #: deletes of identical tasks (:mod:`charai.task_store.reuse`).
    key_lock: str | None = None
    #: Most operations :meth:`UnitRunner.write_each` runs in one transaction, a savepoint each
    #: (``None``: no bound). On PostgreSQL a savepoint that writes is a subtransaction with an
    #: id of its own; a backend keeps up to 64 of them in shared memory, and past that its
    #: transaction "overflows": until it ends, every snapshot taken on the primary and on its
    #: standbys looks subtransactions up in ``pg_subtrans`` (an SLRU cache shared by all), a
    #: known cause of slow reads under load. So more operations run as several transactions.
    max_savepoints: int | None = None


SQLITE = Dialect(
    name="sqlite",
    for_update="",
    skip_locked="",
    append_event=None,
    metadata_json=False,
)

#: Key of the transaction lock that orders event inserts (an arbitrary constant: "chrE").
EVENTS_LOCK_KEY = 0x63687245
#: Key of the session lock that serializes migrators (an arbitrary constant: "chrM").
MIGRATION_LOCK_KEY = 0x6368724D

POSTGRES = Dialect(
    name="postgresql",
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    max_savepoints=64,  # PGPROC_MAX_CACHED_SUBXIDS
    # Parameters: task id, tenant, task type, event type, time, task blob (the event), then
    # status, attempt, whether the state columns stay as they are (a progress report: the row's
    # update_time, when its state last changed, is kept, so the update changes no indexed column
    # and stays HOT; see units._ROW_TAIL), lease expiry, next attempt time, lease owner (the task
    # row). The INSERT reads from the lock's CTE, so the sequence is drawn only once the lock is
    # held.
    append_event=(
        f"WITH l AS (SELECT pg_advisory_xact_lock({EVENTS_LOCK_KEY})),"
        " e AS (INSERT INTO events (task_id, tenant, task_type, type, time, task)"
        " SELECT ?::text, ?::text, ?::integer, ?::integer, ?::bigint, ?::bytea FROM l"
        " RETURNING seq, task_id, time, task)"
        " UPDATE tasks SET status = ?::integer, attempt = ?::integer,"
        " update_time = CASE WHEN ?::boolean THEN tasks.update_time ELSE e.time END,"
        " lease_expires = ?::bigint, next_attempt_time = ?::bigint, lease_owner = ?::text,"
        " last_seq = e.seq, task = e.task"
        " FROM e WHERE tasks.id = e.task_id RETURNING e.seq"
    ),
    metadata_json=True,
    append_event_seq=(
        f"WITH l AS (SELECT pg_advisory_xact_lock({EVENTS_LOCK_KEY})),"
        " e AS (INSERT INTO events (task_id, tenant, task_type, type, time, task)"
        " SELECT ?::text, ?::text, ?::integer, ?::integer, ?::bigint, ?::bytea FROM l"
        " RETURNING seq, task_id)"
        " UPDATE tasks SET last_seq = e.seq FROM e WHERE tasks.id = e.task_id RETURNING e.seq"
    ),
    key_lock="SELECT pg_advisory_xact_lock(?::integer, ?::integer)",
    # Well under deadlock_timeout (1 s): a step that would close a deadlock gives way first.
    brief_lock_wait="SET LOCAL lock_timeout = '50ms'",
    any_lock_wait="SET LOCAL lock_timeout TO DEFAULT",
)


class Backend(Protocol):
    """Runs units of work against one database."""

    dialect: Dialect
    #: Errors after which the backend runs a whole transaction again (PostgreSQL: deadlock,
    #: serialization failure); :meth:`UnitRunner.write_each` lets them through instead of
    #: answering one operation with them.
    retryable: tuple[type[BaseException], ...]
    #: Errors of a lock wait cut short by :attr:`Dialect.brief_lock_wait` (none on SQLite).
    busy: tuple[type[BaseException], ...]

    async def open(self) -> None:
        """Connects and applies the migrations this database lacks."""
        ...

    async def close(self) -> None:
        """Waits for the writes in flight, then disconnects. Idempotent."""
        ...

    async def write(self, body: Body[T], on_commit: Hook = None, on_sealed: Hook = None) -> T:
        """Runs ``body`` in one transaction and commits it; then calls ``on_commit``.

        A write that started runs to its end even if the caller stops waiting, so a committed
        change always reaches ``on_commit`` (which publishes its events).

        ``on_sealed`` is called once ``body`` ran and no write that starts later can be decided
        before this one commits. SQLite calls it on its database thread as soon as the unit's
        savepoint is released, before the COMMIT (and its fsync): every later write runs on that
        thread after the commit. PostgreSQL, whose other connections would not wait, calls it
        right before ``on_commit``. It is called even when the commit then fails: what it starts
        must tolerate a change that never happened (a job handed to the relay whose task was
        never stored: its claim is answered DONE).
        """
        ...

    async def read(self, body: Body[T]) -> T:
        """Runs ``body`` without a write transaction."""
        ...

    async def read_aside(self, body: Body[T]) -> T:
        """Runs ``body``, a read that may take long (an aggregate over recent history), where it
        holds up no write, in one consistent snapshot on SQLite: a connection and thread of its
        own there (the writes' thread would wait for it); a pooled connection, as :meth:`read`,
        on PostgreSQL."""
        ...

    def describe(self) -> str:
        """Where the data lives, for logs: never includes a password."""
        ...


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …`` (quoted literals are left alone).

    The store never uses PostgreSQL's ``?`` JSONB operator, so every ``?`` outside a string
    literal is a parameter.
    """
    out: list[str] = []
    n = 0
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)
