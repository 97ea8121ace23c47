"""The usage ledger's tables (:mod:`charai.task_store.usage`), as :mod:`charai.task_store.schema`'s
migrations create them: the records of metered provider calls (migration 8) and their running
totals per tenant and UTC day and month, which budget checks read (migration 18).
"""

from __future__ import annotations


def records() -> tuple[str, ...]:
    """Migration 8, the same in both dialects. Why one row per (task, attempt): the worker reports
    an attempt's usage with its outcome, and a repeated report (its answer was lost) must not
    count twice (``ON CONFLICT DO NOTHING`` on the key). Costs are whole micro-dollars and audio
    whole microseconds, so sums are exact. Rows outlive their task (DeleteTask, retention): they
    are what budgets and GetUsage count. ``day`` (UTC, ``YYYY-MM-DD``) is what GetUsage groups by;
    ``time`` is what budget periods and day ranges select on (the indexes)."""
    return (
        """CREATE TABLE IF NOT EXISTS usage_records (
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            tenant TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            day TEXT NOT NULL,
            time BIGINT NOT NULL,
            calls INTEGER NOT NULL,
            images INTEGER NOT NULL,
            image_size TEXT NOT NULL,
            image_quality TEXT NOT NULL,
            speech_characters BIGINT NOT NULL,
            audio_us BIGINT NOT NULL,
            cost_micros BIGINT NOT NULL,
            reused INTEGER NOT NULL,
            PRIMARY KEY (task_id, attempt)
        )""",
        "CREATE INDEX IF NOT EXISTS usage_records_tenant ON usage_records (tenant, time)",
        "CREATE INDEX IF NOT EXISTS usage_records_time ON usage_records (time)",
    )


#: What ``usage_totals`` adds up, ``usage_records``' columns of the same names (in the order of
#: ``charai.core.domain.usage.Totals``).
TOTALLED = ("calls", "images", "speech_characters", "audio_us", "cost_micros")
#: The UTC day holding ``time`` (µs), as its first microsecond (Unix time has no leap seconds):
#: ``charai.core.domain.usage.period_window``'s start.
_DAY_START = "{t} - {t} % 86400000000"
#: The UTC month holding ``time`` (µs), as its first microsecond, in each dialect.
_MONTH_START_SQLITE = (
    "CAST(strftime('%s', {t} / 1000000, 'unixepoch', 'start of month') AS INTEGER) * 1000000"
)
_MONTH_START_PG = (
    "(EXTRACT(EPOCH FROM date_trunc('month', to_timestamp({t} / 1000000) AT TIME ZONE 'UTC'))"
    " * 1000000)::BIGINT"
)


def totals(*, postgres: bool) -> tuple[str, ...]:
    """Migration 18: each tenant's usage summed per UTC day and month (``usage_totals``), kept by
    a trigger on ``usage_records`` (so a task_store of an earlier release, during a rolling
    upgrade, adds to it too), and filled from the records already there.

    Why: a create of a tenant with a budget summed the tenant's records of the period
    (``SELECT SUM(...) FROM usage_records WHERE tenant = ? AND time >= ?``) inside the create's
    transaction: one row read per task the tenant ran this month. On SQLite, on the database
    thread every write waits for: at 100,000 records in the month a create took 37 ms and held
    up every other tenant's writes as long (BENCHMARKS.md, twenty-ninth pass). A budget check
    now reads one row per period.

    On PostgreSQL a totals row is a lock that transactions adding to it queue on, so the trigger
    is a deferred constraint trigger: it runs at commit and holds the tenant's rows only while
    the commit finishes. A transaction that wrote events reaches its commit holding the events
    lock, so no two of those ever wait for each other's totals; each record takes its tenant's
    day row, then its month row. Two transactions can deadlock on totals only if one wrote no
    events (a report ignored or refused, whose usage is kept) and recorded two tenants' usage in
    the opposite order of the other: PostgreSQL then aborts one and the backend runs it again.
    (Taking the events lock in the trigger would order everything, but a transaction without
    events would then wait for it holding its task's row, which the events lock's holder may be
    about to lock: a deadlock on any one task, a likelier one.) Creating the trigger locks
    ``usage_records`` against inserts until this migration commits, so the sum below misses and
    doubles no record.

    The sum replaces what the table held: the migration may run again on a database a test
    turned back to an older schema."""
    columns = ", ".join(TOTALLED)
    sums = ", ".join(f"SUM({c})" for c in TOTALLED)
    new = ", ".join(f"NEW.{c}" for c in TOTALLED)
    added = ", ".join(f"{c} = usage_totals.{c} + excluded.{c}" for c in TOTALLED)
    month_start = _MONTH_START_PG if postgres else _MONTH_START_SQLITE
    periods = (("day", _DAY_START), ("month", month_start))
    rows = ", ".join(
        f"(NEW.tenant, '{period}', {start.format(t='NEW.time')}, {new})" for period, start in periods
    )
    # One statement for both periods' rows (one plpgsql statement on PostgreSQL, not two).
    upserts = (
        f"INSERT INTO usage_totals (tenant, period, start, {columns}) VALUES {rows}"
        f" ON CONFLICT (tenant, period, start) DO UPDATE SET {added};"
    )
    fill = tuple(
        f"INSERT INTO usage_totals (tenant, period, start, {columns})"
        f" SELECT tenant, '{period}', {start.format(t='time')}, {sums} FROM usage_records GROUP BY 1, 3"
        for period, start in periods
    )
    table = f"""CREATE TABLE IF NOT EXISTS usage_totals (
            tenant TEXT NOT NULL,
            period TEXT NOT NULL,
            start BIGINT NOT NULL,
            calls BIGINT NOT NULL,
            images BIGINT NOT NULL,
            speech_characters BIGINT NOT NULL,
            audio_us BIGINT NOT NULL,
            cost_micros BIGINT NOT NULL,
            PRIMARY KEY (tenant, period, start)
        ){"" if postgres else " WITHOUT ROWID"}"""
    if postgres:
        trigger: tuple[str, ...] = (
            "CREATE OR REPLACE FUNCTION usage_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {upserts} RETURN NULL; END $$",
            "DROP TRIGGER IF EXISTS usage_totals_add ON usage_records",
            "CREATE CONSTRAINT TRIGGER usage_totals_add AFTER INSERT ON usage_records"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION usage_totals_add()",
        )
    else:
        trigger = (
            "CREATE TRIGGER IF NOT EXISTS usage_totals_add AFTER INSERT ON usage_records"
            f" BEGIN {upserts} END",
        )
    return (table, *trigger, "DELETE FROM usage_totals", *fill)
