"""Queue statistics per lane (GetQueueStats and the queue gauges): aggregates over the shared
database, so every replica answers the same."""

from __future__ import annotations

from charai.core.clock import Clock
from charai.core.domain.states import Status
from charai.task_store.backend import Backend, Tx
from charai.task_store.schema import ENDED, UNFINISHED
from charai.tasks.v1 import task_pb2, task_service_pb2

#: Every lane GetQueueStats reports (empty ones too, so a dashboard's series never vanish).
LANE_TYPES = (task_pb2.TASK_TYPE_IMAGE_GENERATION, task_pb2.TASK_TYPE_TTS_GENERATION)
LANE_PRIORITIES = (task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_LOW)
#: Throughput window of GetQueueStats.
THROUGHPUT_WINDOW_S = 60.0
#: Median-wait window of GetQueueStats, and how far back in the event log it looks at most
#: (a bounded primary-key range scan, so the query costs the same on a years-old log).
WAIT_WINDOW_S = 300.0
WAIT_SCAN_EVENTS = 50_000


class _Lanes:
    """The lanes being filled in, every known lane present from the start."""

    def __init__(self) -> None:
        self._lanes: dict[tuple[int, int], task_service_pb2.LaneStats] = {
            (t, p): task_service_pb2.LaneStats(type=t, priority=p)
            for t in LANE_TYPES
            for p in LANE_PRIORITIES
        }

    def __call__(self, t: int, p: int) -> task_service_pb2.LaneStats:
        key = (t, p)
        if key not in self._lanes:  # a type or priority this build does not list: still shown
            self._lanes[key] = task_service_pb2.LaneStats(type=t, priority=p)  # type: ignore[arg-type]
        return self._lanes[key]

    def ordered(self) -> list[task_service_pb2.LaneStats]:
        return sorted(self._lanes.values(), key=lambda s: (s.type, -s.priority))


class QueueStats:
    def __init__(self, backend: Backend, clock: Clock) -> None:
        self._db = backend
        self._clock = clock

    async def read(self) -> tuple[list[task_service_pb2.LaneStats], int]:
        """Every lane's depth, retry wait, in-flight, throughput and median wait, and the outbox
        backlog.

        Median wait is creation to *first* start (a retried attempt's wait would include its
        back-off) over tasks first started in the last :data:`WAIT_WINDOW_S`, taken in SQL by
        rank (SQLite has no percentile function): the middle sample, or the mean of the two.

        Beside the write path (:meth:`Backend.read_aside`): the median wait and the throughput
        scan recent history, tens of milliseconds on a busy store, which no write waits for.
        """
        return await self._db.read_aside(self._read)

    async def gauges(self) -> tuple[list[task_service_pb2.LaneStats], int]:
        """Every lane's depth, retry wait and in-flight count, and the outbox backlog: what the
        queue gauges show, without the throughput and median wait (:meth:`read`), which scan
        recent history."""
        return await self._db.read_aside(self._read_gauges)

    async def _read_gauges(self, tx: Tx) -> tuple[list[task_service_pb2.LaneStats], int]:
        lane = _Lanes()
        await self._depths(tx, lane, self._clock.now_us())
        backlog = int(await tx.fetchval("SELECT COUNT(*) FROM outbox"))
        return lane.ordered(), backlog

    async def _read(self, tx: Tx) -> tuple[list[task_service_pb2.LaneStats], int]:
        now = self._clock.now_us()
        lane = _Lanes()
        await self._depths(tx, lane, now)
        await self._throughput(tx, lane, now)
        await self._waits(tx, lane, now)
        backlog = int(await tx.fetchval("SELECT COUNT(*) FROM outbox"))
        return lane.ordered(), backlog

    @staticmethod
    async def _depths(tx: Tx, lane: _Lanes, now: int) -> None:
        queued, running = int(Status.QUEUED), int(Status.RUNNING)
        found = await tx.fetch(
            "SELECT type, priority,"
            " SUM(CASE WHEN status = ? AND (next_attempt_time IS NULL OR next_attempt_time <= ?)"
            " THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status = ? AND next_attempt_time > ? THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status = ? THEN 1 ELSE 0 END)"
            f" FROM tasks WHERE {UNFINISHED} GROUP BY type, priority",  # reads tasks_dispatched
            queued,
            now,
            queued,
            now,
            running,
        )
        for t, p, depth, waiting, in_flight in found:
            stats = lane(int(t), int(p))
            stats.depth, stats.waiting_retry, stats.in_flight = int(depth), int(waiting), int(in_flight)

    @staticmethod
    async def _throughput(tx: Tx, lane: _Lanes, now: int) -> None:
        found = await tx.fetch(
            # The recent part of tasks_ended, not every completed task.
            f"SELECT type, priority, COUNT(*) FROM tasks WHERE {ENDED} AND status = ? AND update_time >= ?"
            " GROUP BY type, priority",
            int(Status.COMPLETED),
            now - int(THROUGHPUT_WINDOW_S * 1e6),
        )
        for t, p, done in found:
            stats = lane(int(t), int(p))
            stats.completed_last_minute = int(done)
            stats.throughput_per_second = int(done) / THROUGHPUT_WINDOW_S

    @staticmethod
    async def _waits(tx: Tx, lane: _Lanes, now: int) -> None:
        # The median is taken in SQL (the one or two middle samples of each lane, by their rank):
        # the samples, one per task first started in the window, would otherwise each come back
        # as a row to Python (17,000 rows for 20,000 tasks in five minutes), whose fetching
        # holds the GIL a row at a time while the store's writes wait for it.
        found = await tx.fetch(
            "WITH waits AS ("
            " SELECT t.type AS type, t.priority AS priority,"
            " CASE WHEN e.time > t.create_time THEN e.time - t.create_time ELSE 0 END AS wait"
            " FROM events e JOIN tasks t ON t.id = e.task_id"
            " WHERE e.seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - ? AND e.type = ? AND e.time >= ?"
            " AND NOT EXISTS (SELECT 1 FROM events p WHERE p.task_id = e.task_id AND p.type = ?"
            " AND p.seq < e.seq)),"
            " ranked AS (SELECT type, priority, wait,"
            " ROW_NUMBER() OVER (PARTITION BY type, priority ORDER BY wait) AS k,"
            " COUNT(*) OVER (PARTITION BY type, priority) AS n FROM waits)"
            " SELECT type, priority, MAX(n), AVG(wait) FROM ranked"
            " WHERE k = (n + 1) / 2 OR k = n / 2 + 1 GROUP BY type, priority",
            WAIT_SCAN_EVENTS,
            task_pb2.TASK_EVENT_TYPE_STARTED,
            now - int(WAIT_WINDOW_S * 1e6),
            task_pb2.TASK_EVENT_TYPE_STARTED,
        )
        for t, p, samples, middle in found:
            stats = lane(int(t), int(p))
            stats.median_wait_seconds = float(middle) / 1e6
            stats.wait_samples = int(samples)
