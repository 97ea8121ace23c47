"""The SQLite backend copies its write-ahead log into the database file on a thread of its own
(``charai.task_store.sqlite_checkpoint``), so no commit waits for that copy; closing the store
leaves no log behind."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
from pathlib import Path

from charai.core.clock import ManualClock
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.sqlite_checkpoint import Checkpointer
from charai.task_store.store import StoreConfig, TaskStore, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.conftest import eventually


def voice_request(k: int) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(character_id="char_001", text=f"line {k}", voice_style="calm"),
    )


def tasks_in_the_file_alone(path: Path, scratch: Path) -> int:
    """Tasks in the database file without its log: what checkpoints copied there."""
    shutil.copyfile(path, scratch)
    with contextlib.closing(sqlite3.connect(scratch)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tasks'").fetchone() is None:
            return 0  # not even the schema was copied yet
        return int(conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])


async def test_committed_tasks_reach_the_database_file_without_a_commit_checkpointing(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = open_store(f"sqlite:///{path}", StoreConfig(), clock=ManualClock(tick=1e-6))
    async with store:
        backend = store.backend
        assert isinstance(backend, SqliteBackend) and backend.checkpointer is not None
        for k in range(5):  # a few hundred log pages: far below the writer's own 1,000
            await store.create("t1", voice_request(k))

        async def copied() -> bool:
            try:
                return tasks_in_the_file_alone(path, tmp_path / "copy.db") == 5
            except sqlite3.DatabaseError:  # copied in the middle of a checkpoint's writes
                return False

        await eventually(copied, timeout=30)
        # The checkpointer counts a checkpoint once SQLite returns from it, which is after its
        # pages are in the file (and after their fsync): wait for the count too.
        checkpointer = backend.checkpointer
        await eventually(lambda: checkpointer.checkpoints >= 1, timeout=30)
    # Both connections closed, the checkpointer's first: the writer, last, removed the log.
    assert not Path(f"{path}-wal").exists()  # noqa: ASYNC240 - the store is closed
    assert tasks_in_the_file_alone(path, tmp_path / "after.db") == 5


async def test_without_the_checkpointer_the_log_alone_holds_them(tmp_path: Path) -> None:
    """The same commits with SQLite's own checkpoints only (``checkpoint_interval`` < 0): the
    file alone holds none of them until the log passes 1,000 pages (so the test above is not
    vacuous)."""
    path = tmp_path / "tasks.db"
    store = TaskStore(
        SqliteBackend(path, checkpoint_interval=-1), StoreConfig(), clock=ManualClock(tick=1e-6)
    )
    async with store:
        for k in range(5):
            await store.create("t1", voice_request(k))
        assert tasks_in_the_file_alone(path, tmp_path / "copy.db") == 0


def test_a_stop_between_the_wait_and_the_clear_still_ends_the_thread(tmp_path: Path) -> None:
    # stop() sets "stopping" and wakes the thread; landing after the thread's wait for more
    # commits but before it clears its "dirty" mark, its wake-up is cleared with the mark. The
    # thread must not go back to waiting for a commit that never comes (task_store's close then
    # hung in CI, joining it).
    path = tmp_path / "tasks.db"
    sqlite3.connect(path).close()
    checkpointer = Checkpointer(path, interval=0.001)

    class StopBeforeClear(threading.Event):
        def clear(self) -> None:
            checkpointer._stopping.set()  # what stop() does, at exactly this moment
            self.set()
            super().clear()

    checkpointer._dirty = StopBeforeClear()
    checkpointer.start()
    checkpointer.committed()
    thread = checkpointer._thread
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive(), "the checkpointer thread went back to waiting after stop()"
