"""Versioned, idempotent migrations for both dialects, applied at start.

Each :class:`Migration` carries the same change written for SQLite and for PostgreSQL, under one
version number, so both databases always have the same logical schema at the same version. A
backend applies every version missing from ``schema_version``, each in its own transaction with
its row in ``schema_version``: a crash half-way leaves the version unapplied, and running the
migrations again (every start does) is a no-op. PostgreSQL migrators hold an advisory lock while
they run, so replicas that start together apply each version once (see ``postgres_backend``).

Differences between the dialects, and why:

- ``metadata``: SQLite indexes it as rows of ``task_metadata`` (one per key, in a table WITHOUT
  ROWID keyed by ``(task_id, key)`` since migration 16, with an exact-match index on ``(tenant,
  key, value)``); PostgreSQL keeps it on the task as ``JSONB`` with a GIN index
  (``jsonb_path_ops``), which serves the exact-match filter ``metadata @> $1::jsonb`` for any
  number of keys with one index probe (and takes an entry for each row version that is not
  heap-only: a create, a claim, a completion).
- sequences: ``INTEGER PRIMARY KEY AUTOINCREMENT`` on SQLite, ``BIGSERIAL`` on PostgreSQL. Neither
  reuses a number after a rollback; the store makes commit order equal sequence order (SQLite has
  one writer; PostgreSQL takes a transaction lock before inserting events).
- blobs: ``BLOB`` / ``BYTEA``.
- running tasks by type and tenant (the fair share's counts and probes): a partial index of them,
  ``tasks_running`` (SQLite since migration 11, PostgreSQL since 13, in place of ``tasks_lane``).

Migration 3 gave SQLite per-lane counters of queued tasks (``lane_counts``, kept by triggers on
``tasks``) for ``queue_position``; since the fair-share backlog (migration 7) places every queued
task (:func:`charai.task_store.placement.place`), nothing read them, while every create and
every claim still ran their triggers. Migration 10 drops them.

Partial indexes are conditioned on ranges of statuses or on lists of at most two (migration 17):
SQLite tests each row an insert or update writes against every partial index's condition, and
builds an ephemeral b-tree for an ``IN`` list of three or more values each time it does (two
pages allocated and zeroed): six of them in a task's life, 11 % of task_store's instructions per
task on SQLite before migration 17 (``bench/analysis.md``, twenty-sixth pass).
"""

from __future__ import annotations

import dataclasses

from charai.task_store import usage_schema


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


#: ``tasks.status`` of a queued task (``TASK_STATUS_QUEUED``), for migration 3's lane counters.
_QUEUED = 1
#: The conditions of partial indexes (``tasks_dispatched`` since migration 12, ``tasks_ended``),
#: which queries that are to read those indexes spell with the same literals: a planner proves a
#: query's rows are in a partial index from literals, not from bound parameters.
#:
#: Ranges, not lists of three: SQLite tests a row written against each partial index's
#: condition (an insert's new row, an update's old and new rows), and an ``IN`` list of more than
#: two values is built into an ephemeral b-tree every time it is tested (two pages allocated and
#: zeroed), where a range is two comparisons. A lookup that seeks by an ``IN`` list builds one
#: too; by a range, it reads one stretch of the index. Migration 17.
UNFINISHED = "status IN (1, 2)"
ENDED = "status BETWEEN 3 AND 5"
#: The tasks a reuse lookup may find (``tasks_reuse`` since migration 14): running or completed.
REUSABLE = "status BETWEEN 2 AND 3"


def _reuse_index(reusable: str) -> tuple[str, ...]:
    return (
        "DROP INDEX IF EXISTS tasks_reuse",
        "CREATE INDEX IF NOT EXISTS tasks_reuse ON tasks (tenant, reuse_key, status, update_time)"
        f" WHERE reuse_key IS NOT NULL AND {reusable}",
    )


def _ended_index(ended: str) -> tuple[str, ...]:
    return (
        "DROP INDEX IF EXISTS tasks_ended",
        f"CREATE INDEX IF NOT EXISTS tasks_ended ON tasks (update_time) WHERE {ended}",
    )


#: The conditions as migrations 4 and 14 wrote them (a migration, once released, stays as it was).
_ENDED_4 = "status IN (3, 4, 5)"
_REUSABLE_14 = "status IN (2, 3)"
#: The running tasks by type and tenant (SQLite: migration 11; PostgreSQL: 13).
_RUNNING_INDEX = "CREATE INDEX IF NOT EXISTS tasks_running ON tasks (type, status, tenant) WHERE status = 2"
#: Migration 15: the unfinished tasks that are not held and have no dispatch time yet.
_DISPATCHED_NOW = (
    f"UPDATE tasks SET dispatched_at = update_time WHERE {UNFINISHED} AND held = 0 AND dispatched_at IS NULL"
)
_DISPATCHED = (
    "DROP INDEX IF EXISTS tasks_dispatched",
    f"CREATE INDEX IF NOT EXISTS tasks_dispatched ON tasks (status, dispatched_at) WHERE {UNFINISHED}",
)


def _webhook_tables(blob: str) -> tuple[str, ...]:
    """Migration 5 in either dialect (only the blob type differs)."""
    return (
        f"""CREATE TABLE IF NOT EXISTS webhook_deliveries (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            task_id TEXT NOT NULL,
            url TEXT NOT NULL,
            event_type INTEGER NOT NULL,
            seq BIGINT NOT NULL,
            event {blob} NOT NULL,
            status INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            dispatched INTEGER NOT NULL DEFAULT 0,
            dispatch_gen INTEGER NOT NULL DEFAULT 0,
            claimed_by TEXT,
            claimed_until BIGINT,
            created BIGINT NOT NULL,
            updated BIGINT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS webhook_deliveries_queue"
        " ON webhook_deliveries (task_id, url, status, seq)",
        "CREATE INDEX IF NOT EXISTS webhook_deliveries_tenant ON webhook_deliveries (tenant, created, id)",
        """CREATE TABLE IF NOT EXISTS webhook_attempts (
            delivery_id TEXT NOT NULL,
            n INTEGER NOT NULL,
            time BIGINT NOT NULL,
            http_status INTEGER NOT NULL,
            latency_us BIGINT NOT NULL,
            error TEXT NOT NULL,
            PRIMARY KEY (delivery_id, n)
        )""",
        """CREATE TABLE IF NOT EXISTS webhook_endpoints (
            tenant TEXT NOT NULL,
            url TEXT NOT NULL,
            streak INTEGER NOT NULL DEFAULT 0,
            disabled_at BIGINT,
            PRIMARY KEY (tenant, url)
        )""",
        """CREATE TABLE IF NOT EXISTS webhook_secrets (
            tenant TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            previous_until BIGINT NOT NULL
        )""",
    )


def _fair_tables(held: str, if_not_exists: str) -> tuple[str, ...]:
    """Migration 7 in either dialect (SQLite has no ``ADD COLUMN IF NOT EXISTS``: its version row
    makes it run once). See :mod:`charai.task_store.backlog`.

    - ``tasks.held``: 1 while the task waits in ``backlog`` (its job not released to the workers).
    - ``tasks_buffer``: the released jobs nobody claimed yet, per type; a partial index, so
      counting the buffer (every create and release does) reads only the buffer, however long
      the backlog. Queries name its condition with literals, as here; its columns repeat the
      condition so SQLite's planner prefers it to the queue-order index (``tasks_queue`` until
      migration 11, ``tasks_lane`` on PostgreSQL until 13), which would read the backlog.
    - ``tasks_released``: the queued tasks not held (the buffer and the retries waiting), in the
      order workers take them: a released task's queue position counts a range of it.
    - ``fair_tenants``: each tenant's turn per lane (stride scheduling); ``fair_tenants_turn``
      serves "the next tenant" as one probe of an ordered index over tenants holding work.
    - ``fair_lanes``: each lane's virtual time and turn count (its row is also the releasers' lock).
    """
    return (
        f"ALTER TABLE tasks ADD COLUMN {if_not_exists}held {held}",
        f"CREATE INDEX IF NOT EXISTS tasks_buffer ON tasks (type, status, held, next_attempt_time)"
        f" WHERE status = {_QUEUED} AND held = 0 AND next_attempt_time IS NULL",
        f"CREATE INDEX IF NOT EXISTS tasks_released ON tasks (type, status, held, priority, create_time, id)"
        f" WHERE status = {_QUEUED} AND held = 0",
        """CREATE TABLE IF NOT EXISTS backlog (
            task_id TEXT PRIMARY KEY,
            type INTEGER NOT NULL,
            tenant TEXT NOT NULL,
            rank BIGINT NOT NULL,
            priority INTEGER NOT NULL,
            dispatch_gen INTEGER NOT NULL,
            traceparent TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS backlog_order ON backlog (type, tenant, rank, task_id)",
        """CREATE TABLE IF NOT EXISTS fair_tenants (
            type INTEGER NOT NULL,
            tenant TEXT NOT NULL,
            due BIGINT NOT NULL,
            served BIGINT NOT NULL,
            held INTEGER NOT NULL,
            stride BIGINT NOT NULL,
            PRIMARY KEY (type, tenant)
        )""",
        "CREATE INDEX IF NOT EXISTS fair_tenants_turn ON fair_tenants (type, due, served, tenant)"
        " WHERE held > 0",
        """CREATE TABLE IF NOT EXISTS fair_lanes (
            type INTEGER PRIMARY KEY,
            vtime BIGINT NOT NULL,
            turns BIGINT NOT NULL
        )""",
        "INSERT INTO fair_lanes (type, vtime, turns) VALUES (1, 0, 0), (2, 0, 0) ON CONFLICT DO NOTHING",
    )


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
    Migration(
        3,
        "queued-task counters per lane (SQLite); lane index covers the tie-break on id",
        sqlite=(
            # queue_position without counting the queue: a create (the newest task of its lane)
            # reads these counters and counts only the few tasks queued behind it, so the cost of
            # CreateTask no longer grows with the backlog. Triggers keep the counters exact in the
            # same transaction as the status change (a rolled-back unit rolls its counts back).
            """CREATE TABLE IF NOT EXISTS lane_counts (
                type INTEGER NOT NULL,
                priority INTEGER NOT NULL,
                queued INTEGER NOT NULL,
                PRIMARY KEY (type, priority)
            ) WITHOUT ROWID""",
            f"INSERT INTO lane_counts (type, priority, queued) SELECT type, priority, COUNT(*)"
            f" FROM tasks WHERE status = {_QUEUED} GROUP BY type, priority",
            f"""CREATE TRIGGER IF NOT EXISTS tasks_queued_insert AFTER INSERT ON tasks
                WHEN NEW.status = {_QUEUED}
            BEGIN
                INSERT INTO lane_counts (type, priority, queued) VALUES (NEW.type, NEW.priority, 1)
                ON CONFLICT (type, priority) DO UPDATE SET queued = queued + 1;
            END""",
            f"""CREATE TRIGGER IF NOT EXISTS tasks_queued_update AFTER UPDATE OF status, type, priority
                ON tasks
                WHEN (OLD.status = {_QUEUED} OR NEW.status = {_QUEUED}) AND (OLD.status <> NEW.status
                    OR OLD.type <> NEW.type OR OLD.priority <> NEW.priority)
            BEGIN
                UPDATE lane_counts SET queued = queued - 1
                WHERE OLD.status = {_QUEUED} AND type = OLD.type AND priority = OLD.priority;
                INSERT INTO lane_counts (type, priority, queued)
                SELECT NEW.type, NEW.priority, 1 WHERE NEW.status = {_QUEUED}
                ON CONFLICT (type, priority) DO UPDATE SET queued = queued + 1;
            END""",
            f"""CREATE TRIGGER IF NOT EXISTS tasks_queued_delete AFTER DELETE ON tasks
                WHEN OLD.status = {_QUEUED}
            BEGIN
                UPDATE lane_counts SET queued = queued - 1
                WHERE type = OLD.type AND priority = OLD.priority;
            END""",
            # The tasks queued behind a task are a range of this index (no table lookups for the
            # tie-break on id); it replaces tasks_lane, a prefix of it.
            "CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (type, status, priority, create_time, id)",
            "DROP INDEX IF EXISTS tasks_lane",
        ),
        # PostgreSQL counts in the creating transaction as before (several replicas write; a
        # counter row per lane would be one more lock every create and claim queues on).
        postgres=(),
    ),
    Migration(
        4,
        "index of ended tasks by update time (the retention sweeper's scan)",
        sqlite=(f"CREATE INDEX IF NOT EXISTS tasks_ended ON tasks (update_time) WHERE {_ENDED_4}",),
        postgres=(f"CREATE INDEX IF NOT EXISTS tasks_ended ON tasks (update_time) WHERE {_ENDED_4}",),
    ),
    Migration(
        5,
        "webhook deliveries (written with their events), their attempts, endpoints and secret versions",
        sqlite=_webhook_tables("BLOB"),
        postgres=_webhook_tables("BYTEA"),
    ),
    Migration(
        6,
        "the JetStream sequence of a webhook delivery's job, and an index of due deliveries (lost-job sweep)",
        sqlite=(
            "ALTER TABLE webhook_deliveries ADD COLUMN stream_seq BIGINT",
            "CREATE INDEX IF NOT EXISTS webhook_deliveries_due"
            " ON webhook_deliveries (status, next_attempt_at)",
        ),
        postgres=(
            "ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS stream_seq BIGINT",
            "CREATE INDEX IF NOT EXISTS webhook_deliveries_due"
            " ON webhook_deliveries (status, next_attempt_at)",
        ),
    ),
    Migration(
        7,
        "fair share: held tasks (backlog), each tenant's turn per lane, each lane's virtual time",
        sqlite=_fair_tables("INTEGER NOT NULL DEFAULT 0", if_not_exists=""),
        postgres=_fair_tables("SMALLINT NOT NULL DEFAULT 0", if_not_exists="IF NOT EXISTS "),
    ),
    Migration(
        8,
        "metered usage of provider calls, one row per (task, attempt), kept when the task is deleted",
        sqlite=usage_schema.records(),
        postgres=usage_schema.records(),
    ),
    Migration(
        9,
        "reuse key of a task (identical requests reuse a result), indexed by tenant",
        # NULL for a task that takes no part in reuse (most images), so the index is partial.
        sqlite=(
            "ALTER TABLE tasks ADD COLUMN reuse_key TEXT",
            "CREATE INDEX IF NOT EXISTS tasks_reuse ON tasks (tenant, reuse_key, status, update_time)"
            " WHERE reuse_key IS NOT NULL",
        ),
        postgres=(
            "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS reuse_key TEXT",
            "CREATE INDEX IF NOT EXISTS tasks_reuse ON tasks (tenant, reuse_key, status, update_time)"
            " WHERE reuse_key IS NOT NULL",
        ),
    ),
    Migration(
        10,
        "queued-task counters per lane dropped (SQLite): the fair-share backlog places queued tasks",
        # Nothing has read lane_counts since the backlog (7) took over queue_position, yet its
        # triggers ran in every create and claim (callgrind: 129 K fewer instructions per task's
        # create, claim and completion without them, 7 %; 38 K of them a create's).
        sqlite=(
            "DROP TRIGGER IF EXISTS tasks_queued_insert",
            "DROP TRIGGER IF EXISTS tasks_queued_update",
            "DROP TRIGGER IF EXISTS tasks_queued_delete",
            "DROP TABLE IF EXISTS lane_counts",
        ),
        postgres=(),
    ),
    Migration(
        11,
        "running tasks by type and tenant (SQLite), in place of the queue-order index",
        # What read tasks_queue (type, status, priority, create_time, id) once the lane counters
        # went (10) are the fair share's counts and probes of running tasks: of a type (the
        # buffer's size), and of a type and tenant (a waiting tenant's first turn). A partial index
        # of running tasks answers both from the index alone (tasks_queue read the table for the
        # tenant), and a create, whose task is queued, no longer writes it: callgrind 9 K fewer
        # instructions per create and 15 K per task's create, claim and completion (1 %).
        # PostgreSQL kept tasks_lane for these until migration 13.
        sqlite=(
            _RUNNING_INDEX,
            "DROP INDEX IF EXISTS tasks_queue",
        ),
        postgres=(),
    ),
    Migration(
        12,
        "the sweeper's index holds only unfinished tasks",
        # The lost-job sweep reads queued and running tasks whose job was published, and the
        # queue's statistics the queued and running tasks by status; tasks_dispatched (status,
        # dispatched_at) also held every ended task, which nothing read it for, so a completion
        # moved its entry instead of dropping it, and the index grew with the table.
        sqlite=_DISPATCHED,
        postgres=_DISPATCHED,
    ),
    Migration(
        13,
        "running tasks by type and tenant (PostgreSQL), in place of the lane index",
        # What reads tasks_lane (type, status, priority, create_time) are the fair share's counts
        # and probes of running tasks, as on SQLite before migration 11; the queue's depth count
        # reads tasks_dispatched (12). Every update that is not heap-only (a create's row, a
        # publication's record, a claim, a completion) added an entry to tasks_lane; the partial
        # index gets one only for a running task's row.
        sqlite=(),
        postgres=(
            _RUNNING_INDEX,
            "DROP INDEX IF EXISTS tasks_lane",
        ),
    ),
    Migration(
        14,
        "the reuse index holds only running and completed tasks",
        # A claim's twin lookup reads a key's running and completed tasks, and a delete's shared
        # media its completed ones; tasks_reuse (9) also held every queued, failed and cancelled
        # task with a key, so each create inserted an entry at a random place (the key is a hash)
        # that its claim then moved, and a failure moved it again.
        sqlite=_reuse_index(_REUSABLE_14),
        postgres=_reuse_index(_REUSABLE_14),
    ),
    Migration(
        15,
        "a task counts as dispatched from when its job enters the outbox",
        # dispatched_at was written by the relay's record of the publication, with the stream
        # sequence, which moved the task's tasks_dispatched entry (and on PostgreSQL, an indexed
        # column changing, made the update add an entry to every index). It is now set where the
        # job enters the outbox (a create's insert, a release, a re-dispatch), and the record
        # writes the sequence alone. An unfinished task whose job is still in the outbox gets
        # its time here, or the record, which no longer sets it, would leave it unswept.
        sqlite=(_DISPATCHED_NOW,),
        postgres=(_DISPATCHED_NOW,),
    ),
    Migration(
        16,
        "a task's metadata rows (SQLite) are kept in their key's order, without a rowid",
        # task_metadata was a rowid table with its primary key (task_id, key) in an index of its
        # own: three b-trees took each key of a create (the table, that index, task_metadata_kv).
        # WITHOUT ROWID, the table is that index; task_metadata_kv ends in task_id and key
        # already, so its entries do not grow.
        sqlite=(
            """CREATE TABLE task_metadata_v16 (
                task_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (task_id, key)
            ) WITHOUT ROWID""",
            "INSERT INTO task_metadata_v16 (task_id, tenant, key, value)"
            " SELECT task_id, tenant, key, value FROM task_metadata",
            "DROP TABLE task_metadata",
            "ALTER TABLE task_metadata_v16 RENAME TO task_metadata",
            "CREATE INDEX task_metadata_kv ON task_metadata (tenant, key, value, task_id)",
        ),
        postgres=(),
    ),
    Migration(
        17,
        "the ended and reusable tasks' partial indexes are conditioned on status ranges",
        # tasks_ended's condition was status IN (3, 4, 5): SQLite built an ephemeral b-tree of
        # those three values each time it tested a row against it, which every insert (its new
        # row) and every update of a task (old and new rows) does, four or five times a task's
        # life. The reuse lookup's seek by status IN (2, 3) built one too. Ranges, the same
        # statuses: see ENDED and REUSABLE. PostgreSQL keeps the same conditions (its planner
        # proves them from the same literals).
        sqlite=_ended_index(ENDED) + _reuse_index(REUSABLE),
        postgres=_ended_index(ENDED) + _reuse_index(REUSABLE),
    ),
    Migration(
        18,
        "usage summed per tenant and UTC day and month, for budget checks",
        sqlite=usage_schema.totals(postgres=False),
        postgres=usage_schema.totals(postgres=True),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)"""
