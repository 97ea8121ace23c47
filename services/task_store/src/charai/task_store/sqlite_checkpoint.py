"""WAL checkpoints beside the SQLite backend's write path.

SQLite copies its write-ahead log back into the database file (a checkpoint) inside the COMMIT
that takes the log past 1,000 pages: that commit, and every unit of work queued behind it on the
database thread, waits for the copy and its fsync (4-6 ms on the bench machines, once every
dozen or so tasks' worth of commits: a pickup's p99). :class:`Checkpointer` runs them on a
thread and a connection of its own instead, shortly after commits. A PASSIVE checkpoint never
takes the write lock, so the writer goes on committing meanwhile; it copies only frames that are
committed, and syncs the log before and the database file after, as the writer would
(``synchronous=FULL``).

The writer's own automatic checkpoint stays as a backstop, moved from SQLite's 1,000 pages to
:data:`BACKSTOP_PAGES`: SQLite writes the log from its beginning again only once every frame in
it was copied, which a stream of commits that never pauses does not allow, so under sustained
load the log grows to that size (about 40 MB) and the writer then finishes the copy and rewinds
it. With 1,000 pages the writer went on checkpointing about as often as before under load.
Measured by ``python -m bench.store_inproc --n 20000 --concurrency 64 --commit-times``, against
the same with ``--own-checkpoints`` (SQLite's own checkpoints only), two alternated pairs: 29 and
31 of 584 commits took over 3 ms, p50 1.24-1.30 ms, p99 5.0-5.1 ms; with this, 1 and 3, p50
0.75-0.87 ms, p99 2.2-2.9 ms; creates per second and CPU per create the same within noise.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("sqlite")

#: Log pages at which the writer checkpoints by itself (``PRAGMA wal_autocheckpoint``).
BACKSTOP_PAGES = 10_000
#: Seconds the checkpointer lets commits gather before a checkpoint.
INTERVAL = 0.1


class Checkpointer:
    """Checkpoints the log of the database at ``path`` at most every ``interval`` seconds, and
    only after a commit (:meth:`committed`): an idle store does nothing."""

    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        self._path = path
        self._interval = interval
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Checkpoints run (tests).
        self.checkpoints = 0

    def start(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._thread = threading.Thread(target=self._run, args=(conn,), name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the database thread after each commit."""
        self._dirty.set()

    def stop(self) -> None:
        """Stops the thread (after the checkpoint in hand) and closes its connection."""
        self._stopping.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._dirty.wait()
                # Commits gather for a while: one copy and one fsync of the file for all of them.
                if self._stopping.wait(self._interval):
                    return
                self._dirty.clear()  # before the copy: a commit during it asks for the next one
                if self._stopping.is_set():
                    # stop() came after the wait above but before the clear, which erased its wake-up.
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # the writer's own checkpoint is the backstop
                    log.warning("sqlite_checkpoint_failed", error=str(exc))
                    continue
                self.checkpoints += 1
        finally:
            conn.close()
