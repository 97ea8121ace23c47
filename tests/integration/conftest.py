"""Fixtures of the integration tests: a task_store database on either backend, and a store over
it whose clock the test moves (``ManualClock``), so leases, retries and claims expire when the
test says so instead of after a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from charai.core.clock import ManualClock
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backlog import FairConfig
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2

from tests.integration.store_requests import FAST_RETRY
from tests.pg import PgServer, fresh_database

BACKENDS = ["sqlite", "postgres"]


class Database:
    """Where a test's store keeps its data, whichever the backend; rows are counted from outside
    the store (its own connection), so a check does not trust the code under test."""

    def __init__(self, kind: str, url: str, count: Callable[[str], Any]) -> None:
        self.kind = kind
        self.url = url
        self._count = count

    async def count_rows(self, table: str) -> int:
        result = self._count(table)
        if asyncio.iscoroutine(result):
            result = await result
        return int(result)


def sqlite_count(path: Path) -> Callable[[str], int]:
    def count(table: str) -> int:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    return count


def sqlite_database(path: Path) -> Database:
    return Database("sqlite", f"sqlite:///{path}", sqlite_count(path))


@contextlib.asynccontextmanager
async def backend_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh database for ``request.param``: a SQLite file in ``tmp_path``, or ``CREATE
    DATABASE`` on the session's private PostgreSQL server (``tests/pg.py``; dropped afterwards)."""
    if request.param == "sqlite":
        yield sqlite_database(tmp_path / "tasks.db")
        return
    server: PgServer = request.getfixturevalue("pg_server")
    async with fresh_database(server) as database:
        yield Database("postgres", database.url, database.count_rows)


@pytest.fixture(params=BACKENDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """Runs the test once per backend: a SQLite file, then a fresh PostgreSQL database."""
    async with backend_database(request, tmp_path) as database:
        yield database


class Recorded:
    """A store, the clock it reads, and every envelope it handed to ``on_events`` in order."""

    def __init__(self, store: TaskStore, clock: ManualClock, envelopes: list[spb.EventEnvelope]) -> None:
        self.store = store
        self.clock = clock
        self.envelopes = envelopes

    async def events(self, task_id: str, tenant: str = "t1", after: int = 0) -> list[task_pb2.TaskEvent]:
        events, _ = await self.store.list_events(
            spb.ListEventsRequest(tenant=tenant, task_id=task_id, after_sequence=after)
        )
        return events


@contextlib.asynccontextmanager
async def opened(db: Database, clock: ManualClock | None = None, **config: Any) -> AsyncIterator[Recorded]:
    """The store on ``db`` with ``config`` (fast retries and no fair-share holding unless given),
    opened; on a clock of its own unless ``clock`` is passed (a restart keeps the time line). The
    clock ticks 1 µs per read, so tasks created one after the other are ordered by creation time
    as in production."""
    config.setdefault("retry", FAST_RETRY)
    # Every job queued at create, unless a test asks for fair share's holding (test_fair_share.py).
    config.setdefault("fair", FairConfig(buffer=10_000))
    envelopes: list[spb.EventEnvelope] = []
    clock = clock or ManualClock(tick=1e-6)
    store = open_store(db.url, StoreConfig(**config), envelopes.extend, clock=clock)
    async with store:
        yield Recorded(store, clock, envelopes)


@pytest.fixture
async def rec(db: Database) -> AsyncIterator[Recorded]:
    async with opened(db, lease_seconds=5.0) as recorded:
        yield recorded
