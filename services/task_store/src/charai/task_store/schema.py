"""Versioned, idempotent migrations for both dialects, applied at start.

Each :class:`Migration` carries the same change written for SQLite and for PostgreSQL, under one
version number, so both databases always have the same logical schema at the same version. A
backend applies every version missing from ``schema_version``, each in its own transaction with
its row in ``schema_version``: a crash half-way leaves the version unapplied, and running the
migrations again (every start does) is a no-op. PostgreSQL migrators hold an advisory lock while
they run, so replicas that start together apply each version once (see ``postgres_backend``).

Differences between the dialects, and why:

- ``metadata``: SQLite indexes it as rows of ``task_metadata`` (one per key, an exact-match index
  on ``(tenant, key, value)``); PostgreSQL keeps it on the task as ``JSONB`` with a GIN index
  (``jsonb_path_ops``), which serves the exact-match filter ``metadata @> $1::jsonb`` for any
  number of keys with one index probe.
- sequences: ``INTEGER PRIMARY KEY AUTOINCREMENT`` on SQLite, ``BIGSERIAL`` on PostgreSQL. Neither
  reuses a number after a rollback; the store makes commit order equal sequence order (SQLite has
  one writer; PostgreSQL takes a transaction lock before inserting events).
- blobs: ``BLOB`` / ``BYTEA``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks, metadata, event log, outbox",
        sqlite=(
            """CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                request_id TEXT,
                type INTEGER NOT NULL,
                priority INTEGER NOT NULL,
                status INTEGER NOT NULL,
                attempt INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                next_attempt_time BIGINT,
                lease_expires BIGINT,
                lease_owner TEXT,
                dispatch_gen INTEGER NOT NULL DEFAULT 1,
                stream_seq BIGINT,
                dispatched_at BIGINT,
                last_seq BIGINT NOT NULL DEFAULT 0,
                task BLOB NOT NULL
            )""",
            "CREATE UNIQUE INDEX IF NOT EXISTS tasks_request ON tasks (tenant, request_id)"
            " WHERE request_id IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS tasks_tenant_created ON tasks (tenant, create_time, id)",
            "CREATE INDEX IF NOT EXISTS tasks_lane ON tasks (type, status, priority, create_time)",
            """CREATE TABLE IF NOT EXISTS task_metadata (
                task_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (task_id, key)
            )""",
            "CREATE INDEX IF NOT EXISTS task_metadata_kv ON task_metadata (tenant, key, value, task_id)",
            """CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                task_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                task_type INTEGER NOT NULL,
                type INTEGER NOT NULL,
                time BIGINT NOT NULL,
                task BLOB NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS events_task ON events (task_id, seq)",
            "CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, seq)",
            """CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                task_id TEXT NOT NULL,
                dispatch_gen INTEGER NOT NULL,
                subject TEXT NOT NULL,
                payload BLOB NOT NULL,
                created BIGINT NOT NULL
            )""",
        ),
        postgres=(
            """CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                request_id TEXT,
                type INTEGER NOT NULL,
                priority INTEGER NOT NULL,
                status INTEGER NOT NULL,
                attempt INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                next_attempt_time BIGINT,
                lease_expires BIGINT,
                lease_owner TEXT,
                dispatch_gen INTEGER NOT NULL DEFAULT 1,
                stream_seq BIGINT,
                dispatched_at BIGINT,
                last_seq BIGINT NOT NULL DEFAULT 0,
                metadata JSONB NOT NULL DEFAULT '{}'::jsonb,
                task BYTEA NOT NULL
            )""",
            "CREATE UNIQUE INDEX IF NOT EXISTS tasks_request ON tasks (tenant, request_id)"
            " WHERE request_id IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS tasks_tenant_created ON tasks (tenant, create_time, id)",
            "CREATE INDEX IF NOT EXISTS tasks_lane ON tasks (type, status, priority, create_time)",
            "CREATE INDEX IF NOT EXISTS tasks_metadata ON tasks USING GIN (metadata jsonb_path_ops)",
            """CREATE TABLE IF NOT EXISTS events (
                seq BIGSERIAL PRIMARY KEY,
                task_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                task_type INTEGER NOT NULL,
                type INTEGER NOT NULL,
                time BIGINT NOT NULL,
                task BYTEA NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS events_task ON events (task_id, seq)",
            "CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, seq)",
            """CREATE TABLE IF NOT EXISTS outbox (
                id BIGSERIAL PRIMARY KEY,
                task_id TEXT NOT NULL,
                dispatch_gen INTEGER NOT NULL,
                subject TEXT NOT NULL,
                payload BYTEA NOT NULL,
                created BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "outbox claims (several relays share one database); sweeper index",
        sqlite=(
            # SQLite has no ADD COLUMN IF NOT EXISTS: the version row makes this run once.
            "ALTER TABLE outbox ADD COLUMN claimed_by TEXT",
            "ALTER TABLE outbox ADD COLUMN claimed_until BIGINT",
            "CREATE INDEX IF NOT EXISTS tasks_dispatched ON tasks (status, dispatched_at)",
        ),
        postgres=(
            "ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_by TEXT",
            "ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_until BIGINT",
            "CREATE INDEX IF NOT EXISTS tasks_dispatched ON tasks (status, dispatched_at)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)"""
