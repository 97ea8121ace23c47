"""Versioned, idempotent migrations. The SQL is kept portable (PostgreSQL gets its own dialect
of the few statements that differ: see ``DIALECT_OVERRIDES``)."""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "tasks, metadata, event log, outbox",
        [
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
        ],
    ),
]

SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)"""
