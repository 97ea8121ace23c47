"""When a new task's job reaches the local relay (``TaskStore.hand_off``).

On SQLite it is handed over before its create's COMMIT, so it travels to a worker while the
commit's fsync runs; the worker's claim is still decided after that commit (the database thread
runs it next). On PostgreSQL, where a claim on another connection would not wait, it is handed
over after the commit. A job handed over before a commit that then failed names a task that never
existed: its claim is answered DONE, and the relay's record of it removes no other job's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from charai.core.clock import ManualClock
from charai.core.validation import RequestInvalidError
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backlog import FairConfig
from charai.task_store.commands import ClaimResult
from charai.task_store.outbox import OutboxRow
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.conftest import eventually
from tests.integration.conftest import Database, sqlite_count, sqlite_database
from tests.pg import PgDatabase


def image_request(
    request_id: str = "", prompt: str = "a knight, front view"
) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        request_id=request_id,
        image=task_pb2.ImagePayload(character_id="char_001", prompt=prompt, resolution="1024x1024"),
    )


def voice_request(request_id: str) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        request_id=request_id,
        tts=task_pb2.TtsPayload(character_id="char_001", text="hello", voice_style="calm"),
    )


@contextlib.asynccontextmanager
async def store_on(db: Database) -> AsyncIterator[TaskStore]:
    store = open_store(db.url, StoreConfig(fair=FairConfig(buffer=1000)), clock=ManualClock(tick=1e-6))
    async with store:
        yield store


class Taken:
    """What the store handed to the relay, and how many task rows another connection saw then."""

    def __init__(self, count_tasks: Any = None) -> None:
        self.rows: list[OutboxRow] = []
        self.visible: list[int] = []
        self.threads: list[str] = []
        self._count_tasks = count_tasks

    def __call__(self, rows: list[OutboxRow]) -> None:
        self.rows.extend(rows)
        self.threads.append(threading.current_thread().name)
        if self._count_tasks is not None:
            self.visible.append(self._count_tasks("tasks"))


async def test_sqlite_hands_a_new_job_over_before_the_commit_and_decides_its_claim_after_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    async with store_on(sqlite_database(path)) as store:
        loop = asyncio.get_running_loop()
        claims: list[asyncio.Future[ClaimResult]] = []
        taken = Taken(sqlite_count(path))

        def claim(task_id: str) -> None:
            claims.append(asyncio.ensure_future(store.claim(task_id, 1, "worker-1")))

        def take(rows: list[OutboxRow]) -> None:
            taken(rows)
            # The worker's claim, sent the moment the job is out: queued behind the commit.
            for row in rows:
                loop.call_soon_threadsafe(claim, row.task_id)

        store.hand_off("relay-1", take)
        task, _ = await store.create("t1", image_request())
        assert [r.task_id for r in taken.rows] == [task.id]
        assert taken.threads == ["sqlite"]  # from the database thread ...
        assert taken.visible == [0]  # ... before the create was committed
        assert sqlite_count(path)("tasks") == 1
        await eventually(lambda: len(claims) == 1, timeout=10)
        claimed = await claims[0]
        assert claimed.outcome == spb.CLAIM_OUTCOME_RUN
        assert claimed.task is not None and claimed.task.id == task.id


async def test_postgres_hands_a_new_job_over_after_the_commit(postgres: PgDatabase) -> None:
    async with store_on(Database("postgres", postgres.url, postgres.count_rows)) as store:
        visible: list[asyncio.Future[int]] = []

        def take(rows: list[OutboxRow]) -> None:
            # On the event loop: a count started here runs on another connection right away.
            visible.append(asyncio.ensure_future(postgres.count_rows("tasks")))

        store.hand_off("relay-1", take)
        await store.create("t1", image_request())
        assert len(visible) == 1
        assert await visible[0] == 1


async def test_a_create_rolled_back_to_its_savepoint_hands_nothing_over(tmp_path: Path) -> None:
    """Of the creates sharing one transaction, only those kept hand their jobs over."""
    async with store_on(sqlite_database(tmp_path / "tasks.db")) as store:
        taken = Taken()
        store.hand_off("relay-1", taken)
        first, _ = await store.create("t1", image_request("sheet-1"))
        answers = await store.create_each(
            "t1",
            [
                [(image_request(prompt="a knight, side view"), "")],
                # The second request reuses request_id sheet-1 for a voice line: the batch fails
                # and its first create is rolled back with it.
                [(image_request(prompt="a knight, back view"), ""), (voice_request("sheet-1"), "")],
            ],
        )
        kept = answers[0]
        assert not isinstance(kept, Exception)
        assert isinstance(answers[1], RequestInvalidError)
        assert [r.task_id for r in taken.rows] == [first.id, kept[0][0].id]


class _FailingCommit:
    """The store's sqlite3 connection, whose next COMMIT fails as on a disk error (then rolls
    back, as SQLite does when a commit cannot be written)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_job_handed_over_before_a_failed_commit_is_refused_and_removes_no_other_row(
    tmp_path: Path,
) -> None:
    async with store_on(sqlite_database(tmp_path / "tasks.db")) as store:
        taken = Taken()
        store.hand_off("relay-1", taken)
        backend = store.backend
        assert isinstance(backend, SqliteBackend)
        real_conn = backend._conn
        assert real_conn is not None
        backend._conn = _FailingCommit(real_conn)  # type: ignore[assignment]
        with pytest.raises(sqlite3.OperationalError):
            await store.create("t1", image_request())
        backend._conn = real_conn
        [ghost] = taken.rows  # out before the commit failed
        task, _ = await store.create("t1", image_request())
        real = taken.rows[1]
        assert real.task_id == task.id
        assert real.id == ghost.id  # the failed commit gave its row id back

        # The worker that got the ghost job: no such task, nothing to run.
        claimed = await store.claim(ghost.task_id, 1, "worker-1")
        assert (claimed.outcome, claimed.task) == (spb.CLAIM_OUTCOME_DONE, None)
        # The relay published it and records it: the real job's row (same id) stays.
        await store.mark_dispatched([(ghost, 7)])
        assert [r.task_id for r in await store.pending_dispatches()] == [task.id]
        await store.mark_dispatched([(real, 8)])
        assert await store.pending_dispatches() == []
