"""PostgreSQL backend (asyncpg pool): several task_store replicas share one database.

What makes replicas safe lives in the SQL the store runs (row locks on the task being changed,
``SKIP LOCKED`` claims, the events lock: see :data:`~charai.task_store.backend.POSTGRES`); this
module runs units of work on pooled connections, numbers placeholders, retries the transactions
PostgreSQL aborted to break a deadlock, and applies migrations under an advisory lock so two
replicas starting together do not both run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from charai.core.errors import UnavailableError
from charai.task_store.backend import MIGRATION_LOCK_KEY, POSTGRES, Body, Hook, Row, numbered
from charai.task_store.schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE

T = TypeVar("T")
log = structlog.get_logger("postgres")

#: A transaction PostgreSQL aborted only because of its timing with others: run it again.
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_ATTEMPTS = 3
#: Failing to get a connection at all means nothing happened: the caller may retry (UNAVAILABLE).
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)


#: How long a session of ours may sit inside a transaction without sending anything.
_IDLE_IN_TRANSACTION_MS = 15_000


def redact_url(url: str) -> str:
    """The URL without its password (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _rowcount(status: str) -> int:
    """Rows changed, from a command tag such as ``UPDATE 3`` or ``INSERT 0 1``."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class PgTx:
    """:class:`~charai.task_store.backend.Tx` over an asyncpg connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(numbered(sql), *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        if batch:
            await self._conn.executemany(numbered(sql), batch)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(numbered(sql), *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await self._conn.fetchrow(numbered(sql), *args)
        return None if row is None else tuple(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(numbered(sql), *args)

    async def insert(self, sql: str, key: str, *args: Any) -> int:
        return int(await self._conn.fetchval(numbered(f"{sql} RETURNING {key}"), *args))


class PostgresBackend:
    """:class:`~charai.task_store.backend.Backend` on a PostgreSQL database."""

    dialect = POSTGRES
    retryable: tuple[type[BaseException], ...] = _RETRYABLE
    busy: tuple[type[BaseException], ...] = (asyncpg.exceptions.LockNotAvailableError,)

    def __init__(self, url: str, *, password: str | None = None, pool_size: int = 10) -> None:
        self._url = url
        self._password = password
        self._pool_size = pool_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closed = False

    def describe(self) -> str:
        return redact_url(self._url)

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=60,
                server_settings={
                    "application_name": "charai-task-store",
                    # Our transactions never wait on anything but the database. One left open by a
                    # frozen or cut-off replica would hold the events lock (and its task rows) for
                    # every replica until TCP noticed; the server ends it after this instead.
                    "idle_in_transaction_session_timeout": str(_IDLE_IN_TRANSACTION_MS),
                },
            )
        except _UNREACHABLE as exc:
            # asyncpg's message names host and user, never the password.
            raise UnavailableError(f"cannot connect to {self.describe()}: {exc}") from exc
        try:
            await self._migrate()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def _migrate(self) -> None:
        """Applies missing versions, one transaction each, holding the migration lock.

        The session-level advisory lock makes concurrent starts queue: the first replica migrates,
        the others find every version applied. ``CREATE … IF NOT EXISTS`` alone is not enough:
        two sessions creating the same table at once fail on PostgreSQL's catalog unique index.
        """
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                await conn.execute(SCHEMA_VERSION_TABLE)
                done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
                for migration in MIGRATIONS:
                    if migration.version in done:
                        continue
                    async with conn.transaction():
                        for sql in migration.postgres:
                            await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_version (version, description, applied_at)"
                            " VALUES ($1, $2, $3)",
                            migration.version,
                            migration.description,
                            time.time_ns() // 1000,
                        )
                    log.info("migration_applied", version=migration.version, database=self.describe())
                newest = max(done, default=0)
                if newest > LATEST_VERSION:
                    # A newer task_store migrated this database (a rolling upgrade): migrations
                    # only add, so this one keeps working.
                    log.warning("schema_newer_than_code", schema=newest, code=LATEST_VERSION)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._pool is not None:
            try:
                async with asyncio.timeout(10):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    # -- units of work -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL store is not open")
        try:
            conn = await self._pool.acquire(timeout=10)
        except _UNREACHABLE as exc:
            raise UnavailableError("the task database is unreachable") from exc
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    async def write(self, body: Body[T], on_commit: Hook = None, on_sealed: Hook = None) -> T:
        # Shielded: a caller that gives up (an RPC deadline) does not cut a transaction in half
        # between COMMIT and on_commit, which publishes its events. SQLite's thread behaves the
        # same way. close() waits for these.
        task = asyncio.ensure_future(self._write(body, on_commit, on_sealed))
        self._inflight.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so an abandoned write's error is not reported twice

    async def _write(self, body: Body[T], on_commit: Hook, on_sealed: Hook) -> T:
        async with self._connection() as conn:
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    async with conn.transaction():
                        result = await body(PgTx(conn))
                    break
                except _RETRYABLE as exc:
                    if attempt == _ATTEMPTS:
                        raise
                    # Where it happened ("while updating tuple ... in relation ..."): no values.
                    where = exc.as_dict().get("context", "")
                    log.info("transaction_retried", error=type(exc).__name__, attempt=attempt, where=where)
        # After the commit here: a claim on another connection could otherwise come first.
        if on_sealed is not None:
            on_sealed()
        if on_commit is not None:
            on_commit()
        return result

    async def read(self, body: Body[T]) -> T:
        async with self._connection() as conn:
            return await body(PgTx(conn))

    async def read_aside(self, body: Body[T]) -> T:
        return await self.read(body)  # a connection of the pool: no write waits for it
