"""task_store on both of its backends, a real SQLite file and a real PostgreSQL database (the
private server of ``tests/pg.py``): the store directly, and through its gRPC API (a real
``grpc.aio`` server on port 0 inside TaskStoreApp, connected to a real nats-server).

Every portable test takes the ``db`` fixture, parametrized over ``sqlite`` and ``postgres``, so
the same contract holds on both. The checks that only mean something for SQLite (the file is in
WAL mode) are separate tests that run on SQLite alone, on purpose rather than skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.errors import StaleAttemptError, TaskEndedError
from charai.core.storeclient import StoreClient
from charai.core.validation import RequestInvalidError
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.task_store.store import StoreConfig, TaskStore
from charai.task_store.store import open_store as open_backend_store
from charai.taskapi import error_details
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    DEFER,
    DONE,
    EV,
    FAILED,
    FAST_RETRY,
    IMAGE,
    QUEUED,
    RUN,
    RUNNING,
    TTS,
    complete_req,
    fail_req,
    image_request,
    image_result,
    tts_request,
)
from tests.pg import PgServer, fresh_database

if TYPE_CHECKING:
    from tests.conftest import NatsServer


def tts_result() -> task_pb2.TtsResult:
    return task_pb2.TtsResult(
        audio_url="charai-media:x.wav", text="hello", voice_style="calm", duration_seconds=1.0
    )


class Database:
    """One test's database on one backend: its URL, and row counts read from outside the store
    (its own connection), so a check does not trust the code under test to report itself."""

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


BACKENDS = ["sqlite", "postgres"]


@contextlib.asynccontextmanager
async def backend_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh database for ``request.param``: a SQLite file in ``tmp_path``, or ``CREATE
    DATABASE`` on the session's private PostgreSQL server (``tests/pg.py``; dropped afterwards)."""
    if request.param == "sqlite":
        path = tmp_path / "tasks.db"
        yield Database("sqlite", f"sqlite:///{path}", sqlite_count(path))
        return
    server: PgServer = request.getfixturevalue("pg_server")
    async with fresh_database(server) as database:
        yield Database("postgres", database.url, database.count_rows)


@pytest.fixture(params=BACKENDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """Runs the test once per backend (``test_outbox`` declares the same fixture)."""
    async with backend_database(request, tmp_path) as database:
        yield database


class Recorded:
    """A store plus every envelope it handed to ``on_events``, in the order it handed them."""

    def __init__(self, url: str, config: StoreConfig) -> None:
        self.url = url
        self.envelopes: list[spb.EventEnvelope] = []
        self.store: TaskStore = open_backend_store(url, config, self.envelopes.extend)

    async def events(self, task_id: str, tenant: str = "t1", after: int = 0) -> list[task_pb2.TaskEvent]:
        events, _ = await self.store.list_events(
            spb.ListEventsRequest(tenant=tenant, task_id=task_id, after_sequence=after)
        )
        return events


@contextlib.asynccontextmanager
async def open_store(db: Database, **config: Any) -> AsyncIterator[Recorded]:
    config.setdefault("retry", FAST_RETRY)
    rec = Recorded(db.url, StoreConfig(**config))
    async with rec.store:
        yield rec


@pytest.fixture
async def rec(db: Database) -> AsyncIterator[Recorded]:
    async with open_store(db, lease_seconds=5.0) as recorded:
        yield recorded


# -- create, idempotency, listing ------------------------------------------------------------
async def test_create_returns_queued_task_with_first_events_and_filled_metadata(rec: Recorded) -> None:
    store = rec.store
    task, created = await store.create(
        "t1",
        image_request(metadata={"category": "gallery", "characterName": "Set by client"}, costume_id="c_9"),
    )
    assert created
    assert task.status == QUEUED
    assert task.progress == 0
    assert task.stage == "queued"
    assert task.attempt == 0
    assert task.queue_position == 1
    assert task.id.startswith("task_")
    assert task.image.prompt == "a knight in silver armour"
    # Metadata filled from the payload, but a key the client set is kept as the client set it.
    assert dict(task.metadata) == {
        "category": "gallery",
        "characterId": "char_001",
        "characterName": "Set by client",
        "viewType": "front",
        "costumeId": "c_9",
    }

    second, _ = await store.create("t1", tts_request("char_002"))
    assert dict(second.metadata) == {"characterId": "char_002", "characterName": "Aki"}

    first_events = await rec.events(task.id)
    second_events = await rec.events(second.id)
    assert [(e.sequence, e.type) for e in first_events] == [(1, EV.TASK_EVENT_TYPE_QUEUED)]
    assert [(e.sequence, e.type) for e in second_events] == [(2, EV.TASK_EVENT_TYPE_QUEUED)]
    assert first_events[0].task.id == task.id
    assert first_events[0].task.status == QUEUED
    # Each create also queued exactly one dispatch in the outbox (same transaction).
    pending = await store.pending_dispatches()
    assert [(r.task_id, r.dispatch_gen, r.subject) for r in pending] == [
        (task.id, 1, "charai.jobs.image.normal"),
        (second.id, 1, "charai.jobs.tts.normal"),
    ]
    fetched = await store.get("t1", task.id)
    assert fetched.id == task.id
    assert fetched.status == QUEUED


async def test_request_id_makes_create_idempotent(db: Database, rec: Recorded) -> None:
    store = rec.store
    first, created_first = await store.create("t1", image_request(request_id="req-42"))
    again, created_again = await store.create("t1", image_request(request_id="req-42", prompt="changed"))
    assert created_first
    assert not created_again
    assert again.id == first.id
    assert again.image.prompt == first.image.prompt
    # Another tenant may use the same request_id for its own task.
    other, created_other = await store.create("t2", image_request(request_id="req-42"))
    assert created_other
    assert other.id != first.id
    # The same request_id for another type is a client bug, named as such.
    with pytest.raises(RequestInvalidError) as err:
        await store.create("t1", tts_request(request_id="req-42"))
    assert [v.field for v in err.value.violations] == ["request_id"]

    assert await db.count_rows("tasks") == 2
    assert await db.count_rows("outbox") == 2
    assert await db.count_rows("events") == 2
    tasks, _ = await store.list_tasks("t1", task_service_pb2.ListTasksRequest())
    assert [t.id for t in tasks] == [first.id]


async def test_list_tasks_filters_orders_newest_first_and_pages(rec: Recorded) -> None:
    store = rec.store
    made: list[task_pb2.Task] = []
    specs = [
        ("char_a", "gallery", IMAGE),
        ("char_a", "voice", TTS),
        ("char_b", "gallery", IMAGE),
        ("char_a", "gallery", IMAGE),
        ("char_b", "voice", TTS),
        ("char_a", "gallery", TTS),
        ("char_a", "gallery", IMAGE),
    ]
    for character, category, kind in specs:
        req = image_request(character) if kind == IMAGE else tts_request(character)
        req.metadata["category"] = category
        task, _ = await store.create("t1", req)
        made.append(task)
    await store.create("t2", image_request("char_a", metadata={"category": "gallery"}))
    newest_first = [t.id for t in reversed(made)]

    async def ids(**kwargs: Any) -> list[str]:
        tasks, token = await store.list_tasks("t1", task_service_pb2.ListTasksRequest(**kwargs))
        assert token == ""
        return [t.id for t in tasks]

    assert await ids() == newest_first
    char_a = [t.id for t in reversed(made) if t.metadata["characterId"] == "char_a"]
    assert await ids(metadata={"characterId": "char_a"}) == char_a
    both = [
        t.id
        for t in reversed(made)
        if t.metadata["characterId"] == "char_a" and t.metadata["category"] == "gallery"
    ]
    assert len(both) == 4
    assert await ids(metadata={"characterId": "char_a", "category": "gallery"}) == both
    assert await ids(metadata={"characterId": "char_a", "category": "nope"}) == []
    assert await ids(metadata={"characterId": "char_a", "category": "gallery"}, type=TTS) == [made[5].id]
    assert await ids(type=IMAGE) == [t.id for t in reversed(made) if t.type == IMAGE]

    await store.cancel("t1", made[2].id)
    await store.claim(made[3].id, 1, "w")
    assert await ids(status=CANCELLED) == [made[2].id]
    assert await ids(status=RUNNING) == [made[3].id]
    assert await ids(status=QUEUED, metadata={"characterId": "char_b"}) == [made[4].id]

    # Pagination: pages of 3 cover everything once, in order, and the last page has no token.
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        tasks, token = await store.list_tasks(
            "t1", task_service_pb2.ListTasksRequest(page_size=3, page_token=token)
        )
        pages += 1
        seen += [t.id for t in tasks]
        assert len(tasks) <= 3
        if not token:
            break
    assert pages == 3
    assert seen == newest_first
    # Tokens combine with a filter.
    page1, token = await store.list_tasks(
        "t1", task_service_pb2.ListTasksRequest(metadata={"characterId": "char_a"}, page_size=2)
    )
    page2, token2 = await store.list_tasks(
        "t1",
        task_service_pb2.ListTasksRequest(metadata={"characterId": "char_a"}, page_size=2, page_token=token),
    )
    assert [t.id for t in page1 + page2] == char_a[:4]
    assert token2

    with pytest.raises(RequestInvalidError) as err:
        await store.list_tasks("t1", task_service_pb2.ListTasksRequest(page_token="not a token!"))
    assert [v.field for v in err.value.violations] == ["page_token"]


# -- the state machine -----------------------------------------------------------------------
async def test_claim_progress_complete_and_terminal_is_final(rec: Recorded) -> None:
    store = rec.store
    task, _ = await store.create("t1", image_request())
    claim = await store.claim(task.id, 1, "worker-a")
    assert claim.outcome == RUN
    assert claim.attempt == 1
    assert claim.task is not None
    assert claim.task.status == RUNNING
    assert claim.task.attempt == 1
    assert claim.task.progress == 10
    assert claim.task.HasField("start_time")

    assert await store.progress(task.id, 1, 5, "generating") == RUNNING  # clamped up to 10
    assert (await store.get("t1", task.id)).progress == 10
    await store.progress(task.id, 1, 55, "generating")
    await store.progress(task.id, 1, 30, "generating")  # never goes back
    assert (await store.get("t1", task.id)).progress == 55
    await store.progress(task.id, 1, 150, "processing")  # clamped down to 90
    running = await store.get("t1", task.id)
    assert (running.progress, running.stage) == (90, "processing")

    done = await store.complete(complete_req(task.id, 1))
    assert done.status == COMPLETED
    assert done.progress == 100
    assert done.image_result.image_url == "charai-media:x.png"
    assert done.HasField("end_time")

    types = [e.type for e in await rec.events(task.id)]
    assert types == [
        EV.TASK_EVENT_TYPE_QUEUED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_PROGRESS,  # 10, stage "generating"
        EV.TASK_EVENT_TYPE_PROGRESS,  # 55
        EV.TASK_EVENT_TYPE_PROGRESS,  # 90 (the 30 changed nothing, so made no event)
        EV.TASK_EVENT_TYPE_COMPLETED,
    ]
    head = (await rec.events(task.id))[-1].sequence

    with pytest.raises(TaskEndedError):
        await store.progress(task.id, 1, 95, "processing")
    with pytest.raises(TaskEndedError):
        await store.complete(complete_req(task.id, 2))
    outcome, _, after_fail = await store.fail(fail_req(task.id, 1, ErrorKind.PROVIDER_TIMEOUT))
    assert outcome == spb.FAIL_OUTCOME_IGNORED
    assert after_fail.status == COMPLETED
    unchanged, was_running = await store.cancel("t1", task.id)
    assert not was_running
    assert unchanged.status == COMPLETED
    assert unchanged.progress == 100
    claim_again = await store.claim(task.id, 1, "worker-b")
    assert claim_again.outcome == DONE
    # Nothing after the terminal event.
    events = await rec.events(task.id)
    assert events[-1].sequence == head
    assert events[-1].type == EV.TASK_EVENT_TYPE_COMPLETED

    # A cancelled task is final as well.
    other, _ = await store.create("t1", image_request())
    await store.claim(other.id, 1, "worker-a")
    await store.cancel("t1", other.id)
    with pytest.raises(TaskEndedError):
        await store.complete(complete_req(other.id, 1))
    with pytest.raises(TaskEndedError):
        await store.progress(other.id, 1, 50, "generating")
    assert (await store.get("t1", other.id)).status == CANCELLED


async def test_complete_records_the_progress_it_carries_first_in_the_same_commit(rec: Recorded) -> None:
    store = rec.store
    task, _ = await store.create("t1", image_request())
    await store.claim(task.id, 1, "worker-a")
    before = len(rec.envelopes)
    request = complete_req(task.id, 1)
    request.progress, request.stage = 150, "processing"  # clamped to 90 like a report
    done = await store.complete(request)
    assert (done.status, done.progress) == (COMPLETED, 100)
    events = await rec.events(task.id)
    assert [(e.type, e.task.progress, e.task.stage) for e in events[-2:]] == [
        (EV.TASK_EVENT_TYPE_PROGRESS, 90, "processing"),
        (EV.TASK_EVENT_TYPE_COMPLETED, 100, "completed"),
    ]
    # One unit: both envelopes handed over together, chained (the completion names the progress).
    progress_env, completed_env = rec.envelopes[before:]
    assert completed_env.prev_sequence == progress_env.event.sequence

    # Progress that is no news (same value and stage, or backwards) adds no event.
    other, _ = await store.create("t1", image_request())
    await store.claim(other.id, 1, "worker-a")
    await store.progress(other.id, 1, 90, "processing")
    request = complete_req(other.id, 1)
    request.progress, request.stage = 40, "processing"
    await store.complete(request)
    types = [e.type for e in await rec.events(other.id)]
    assert types[-2:] == [EV.TASK_EVENT_TYPE_PROGRESS, EV.TASK_EVENT_TYPE_COMPLETED]
    assert types.count(EV.TASK_EVENT_TYPE_PROGRESS) == 1


async def test_fencing_after_lease_expiry(db: Database) -> None:
    async with open_store(db, lease_seconds=0.5) as rec:
        store = rec.store
        task, _ = await store.create("t1", image_request())
        first = await store.claim(task.id, 1, "worker-a")
        assert (first.outcome, first.attempt) == (RUN, 1)
        await asyncio.sleep(0.3)
        await store.progress(task.id, 1, 40, "generating")  # renews the lease
        await asyncio.sleep(0.3)
        assert (await store.claim(task.id, 1, "worker-b")).outcome == DEFER  # renewed, still alive
        await asyncio.sleep(0.6)

        second = await store.claim(task.id, 1, "worker-b")
        assert (second.outcome, second.attempt) == (RUN, 2)
        assert second.task is not None
        assert second.task.attempt == 2
        assert second.task.error.code == task_pb2.ERROR_CODE_WORKER_LOST

        with pytest.raises(StaleAttemptError):
            await store.progress(task.id, 1, 60, "generating")
        with pytest.raises(StaleAttemptError):
            await store.complete(complete_req(task.id, 1))
        outcome, _, _ = await store.fail(fail_req(task.id, 1, ErrorKind.PROVIDER_TIMEOUT))
        assert outcome == spb.FAIL_OUTCOME_IGNORED
        assert (await store.get("t1", task.id)).status == RUNNING

        done = await store.complete(complete_req(task.id, 2))
        assert (done.status, done.attempt, done.progress) == (COMPLETED, 2, 100)
        assert not done.HasField("error")
        count = len(await rec.events(task.id))
        again = await store.complete(complete_req(task.id, 2))  # e.g. the ack was lost
        assert again.status == COMPLETED
        assert again.attempt == 2
        assert len(await rec.events(task.id)) == count  # no second COMPLETED event
        with pytest.raises(TaskEndedError):
            await store.complete(complete_req(task.id, 1))
        types = [e.type for e in await rec.events(task.id)]
        assert types.count(EV.TASK_EVENT_TYPE_STARTED) == 2
        assert types.count(EV.TASK_EVENT_TYPE_COMPLETED) == 1


async def test_claim_defers_while_leased_or_waiting_for_a_retry(rec: Recorded) -> None:
    store = rec.store  # lease 5 s
    task, _ = await store.create("t1", image_request())
    claim_began = time.monotonic()
    assert (await store.claim(task.id, 1, "a")).outcome == RUN
    claim_ended = time.monotonic()
    await asyncio.sleep(0.5)
    defer_began = time.monotonic()
    deferred = await store.claim(task.id, 1, "b")
    defer_ended = time.monotonic()
    assert deferred.outcome == DEFER
    assert deferred.attempt == 0
    # retry_after is what is left of the 5 s lease.
    assert 5.0 - (defer_ended - claim_began) - 0.05 <= deferred.retry_after
    assert deferred.retry_after <= 5.0 - (defer_began - claim_ended) + 0.05

    outcome, delay, waiting = await store.fail(
        spb.FailTaskRequest(
            task_id=task.id,
            attempt=1,
            error=task_pb2.TaskError(code=task_pb2.ERROR_CODE_RATE_LIMITED, message="slow down"),
            retry_after_seconds=2.0,
        )
    )
    assert outcome == spb.FAIL_OUTCOME_RETRY
    assert delay >= 2.0  # Retry-After is a floor
    assert waiting.status == QUEUED
    not_yet = await store.claim(task.id, 1, "b")
    assert not_yet.outcome == DEFER
    next_at = waiting.next_attempt_time.ToMicroseconds() / 1e6
    assert not_yet.retry_after == pytest.approx(next_at - time.time(), abs=0.2)
    assert (await store.get("t1", task.id)).status == QUEUED


async def test_lost_worker_exhausts_attempts_and_fails(db: Database) -> None:
    retry = RetryPolicy(base=0.05, cap=0.2, max_attempts=2)
    async with open_store(db, lease_seconds=0.2, max_attempts=2, retry=retry) as rec:
        store = rec.store
        task, _ = await store.create("t1", image_request())
        assert (await store.claim(task.id, 1, "a")).attempt == 1
        await asyncio.sleep(0.3)
        assert (await store.claim(task.id, 1, "b")).attempt == 2
        await asyncio.sleep(0.3)
        last = await store.claim(task.id, 1, "c")
        assert last.outcome == DONE
        failed = await store.get("t1", task.id)
        assert failed.status == FAILED
        assert failed.error.code == task_pb2.ERROR_CODE_WORKER_LOST
        assert not failed.error.retryable
        assert failed.attempt == 2
        assert [e.type for e in await rec.events(task.id)][-1] == EV.TASK_EVENT_TYPE_FAILED


async def test_fail_retries_retryable_kinds_up_to_their_limit(rec: Recorded) -> None:
    store = rec.store
    # PROVIDER_BAD_RESPONSE allows 2 retries: attempts 1 and 2 are retried, attempt 3 fails.
    task, _ = await store.create("t1", image_request())
    for attempt in (1, 2, 3):
        claim = None
        for _ in range(100):
            claim = await store.claim(task.id, 1, "w")
            if claim.outcome != DEFER:
                break
            await asyncio.sleep(claim.retry_after)
        assert claim is not None
        assert (claim.outcome, claim.attempt) == (RUN, attempt)
        outcome, delay, after = await store.fail(
            fail_req(task.id, attempt, ErrorKind.PROVIDER_BAD_RESPONSE, f"garbage {attempt}")
        )
        if attempt < 3:
            assert outcome == spb.FAIL_OUTCOME_RETRY
            assert 0 < delay <= 0.2
            assert after.status == QUEUED
            assert after.stage == "waiting_retry"
            assert after.progress == 0
            assert after.HasField("next_attempt_time")
            assert after.error.code == task_pb2.ERROR_CODE_PROVIDER_BAD_RESPONSE
            assert after.error.message == f"garbage {attempt}"
            assert after.error.retryable
        else:
            assert outcome == spb.FAIL_OUTCOME_FAILED
            assert after.status == FAILED
            assert after.error.message == "garbage 3"
            assert not after.error.retryable
            assert after.HasField("end_time")
    types = [e.type for e in await rec.events(task.id)]
    assert types == [
        EV.TASK_EVENT_TYPE_QUEUED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_FAILED,
    ]
    retry_events = [e for e in await rec.events(task.id) if e.type == EV.TASK_EVENT_TYPE_RETRY_SCHEDULED]
    assert [e.task.attempt for e in retry_events] == [1, 2]
    assert all(e.task.HasField("next_attempt_time") for e in retry_events)

    # Non-retryable kinds fail at once.
    for kind in (
        ErrorKind.CONTENT_REJECTED,
        ErrorKind.PROVIDER_AUTH,
        ErrorKind.INVALID_REQUEST,
        ErrorKind.QUOTA_EXHAUSTED,
    ):
        other, _ = await store.create("t1", image_request())
        await store.claim(other.id, 1, "w")
        outcome, _, after = await store.fail(fail_req(other.id, 1, kind, "no"))
        assert outcome == spb.FAIL_OUTCOME_FAILED, kind
        assert after.status == FAILED
        assert after.error.code == int(kind)
        assert after.attempt == 1


# -- cancel and the event log ----------------------------------------------------------------
async def test_cancel_queued_and_running_tasks(rec: Recorded) -> None:
    store = rec.store
    queued, _ = await store.create("t1", image_request())
    running, _ = await store.create("t1", image_request())
    await store.claim(running.id, 1, "w")

    cancelled, was_running = await store.cancel("t1", queued.id)
    assert (cancelled.status, was_running) == (CANCELLED, False)
    assert cancelled.HasField("end_time")
    cancelled, was_running = await store.cancel("t1", running.id)
    assert (cancelled.status, was_running) == (CANCELLED, True)
    for task_id in (queued.id, running.id):
        events = await rec.events(task_id)
        assert events[-1].type == EV.TASK_EVENT_TYPE_CANCELLED
        assert events[-1].task.status == CANCELLED
    # A job delivered afterwards finds nothing to do; the worker still holding it is refused.
    assert (await store.claim(queued.id, 1, "w")).outcome == DONE
    with pytest.raises(TaskEndedError):
        await store.progress(running.id, 1, 50, "generating")


async def test_list_events_after_sequence_by_task_and_by_filter(rec: Recorded) -> None:
    store = rec.store
    a, _ = await store.create("t1", image_request("char_a"))
    b, _ = await store.create("t1", image_request("char_b"))
    c, _ = await store.create("t1", tts_request("char_a"))
    await store.create("t2", image_request("char_a"))
    await store.claim(a.id, 1, "w")
    await store.claim(b.id, 1, "w")
    cursor = (await rec.events(a.id))[-1].sequence  # a's STARTED
    await store.progress(a.id, 1, 50, "generating")
    await store.progress(b.id, 1, 50, "generating")
    await store.cancel("t1", c.id)
    await store.complete(complete_req(a.id, 1))

    later = await rec.events(a.id, after=cursor)
    assert [e.type for e in later] == [EV.TASK_EVENT_TYPE_PROGRESS, EV.TASK_EVENT_TYPE_COMPLETED]
    assert all(e.sequence > cursor for e in later)
    assert [e.sequence for e in later] == sorted(e.sequence for e in later)
    assert await rec.events(a.id, tenant="t2") == []  # another tenant's task

    events, head = await store.list_events(
        spb.ListEventsRequest(tenant="t1", metadata={"characterId": "char_a"}, after_sequence=cursor)
    )
    assert [(e.task.id, e.type) for e in events] == [
        (a.id, EV.TASK_EVENT_TYPE_PROGRESS),
        (c.id, EV.TASK_EVENT_TYPE_CANCELLED),
        (a.id, EV.TASK_EVENT_TYPE_COMPLETED),
    ]
    assert head == events[-1].sequence
    image_only, _ = await store.list_events(
        spb.ListEventsRequest(
            tenant="t1", metadata={"characterId": "char_a"}, type=IMAGE, after_sequence=cursor
        )
    )
    assert [e.task.id for e in image_only] == [a.id, a.id]
    everything, _ = await store.list_events(spb.ListEventsRequest(tenant="t1"))
    assert len(everything) == 9  # 3 queued, 2 started, 2 progress, cancelled, completed
    assert {e.task.id for e in everything} == {a.id, b.id, c.id}
    limited, _ = await store.list_events(spb.ListEventsRequest(tenant="t1", after_sequence=cursor, limit=2))
    assert [e.sequence for e in limited] == [e.sequence for e in everything if e.sequence > cursor][:2]


async def test_envelopes_chain_per_task_and_match_the_log(db: Database, rec: Recorded) -> None:
    """What the event publisher and the gateways rely on. Sequence order is commit order on both
    backends, but only SQLite (one database thread) also *hands* envelopes over in that order;
    PostgreSQL's concurrent transactions may finish their after-commit callbacks out of order,
    which ``prev_sequence`` exists for (the gateway fills a gap from the store). So the strict
    hand-over order is asserted on SQLite only; the chain and the log are asserted on both."""
    store = rec.store
    created = await asyncio.gather(*(store.create("t1", image_request(f"c{i}")) for i in range(12)))
    ids = [t.id for t, _ in created]
    await asyncio.gather(*(store.claim(i, 1, "w") for i in ids))
    await asyncio.gather(
        *(store.progress(i, 1, 20 + n, "generating") for n, i in enumerate(ids)),
        *(store.cancel("t1", i) for i in ids[::3]),
    )
    await asyncio.gather(
        *(store.complete(complete_req(i, 1)) for n, i in enumerate(ids) if n % 3 == 1),
        *(store.fail(fail_req(i, 1, ErrorKind.CONTENT_REJECTED)) for n, i in enumerate(ids) if n % 3 == 2),
    )

    sequences = [env.event.sequence for env in rec.envelopes]
    assert len(set(sequences)) == len(sequences)
    if db.kind == "sqlite":
        assert sequences == sorted(sequences), "SQLite hands envelopes over in commit order"
    # Nothing was rolled back after taking a sequence here, so there are no holes either.
    assert sorted(sequences) == list(range(1, len(sequences) + 1))
    in_order = sorted(rec.envelopes, key=lambda env: env.event.sequence)
    last: dict[str, int] = {}
    for env in in_order:
        assert env.tenant == "t1"
        task_id = env.event.task.id
        assert env.prev_sequence == last.get(task_id, 0), f"gap in the chain of {task_id}"
        last[task_id] = env.event.sequence
    # The envelopes are exactly the stored log.
    stored, head = await store.list_events(spb.ListEventsRequest(tenant="t1"))
    assert [(e.sequence, e.type, e.task.id) for e in stored] == [
        (env.event.sequence, env.event.type, env.event.task.id) for env in in_order
    ]
    assert head == max(sequences)
    for task_id in ids:
        final = [env for env in in_order if env.event.task.id == task_id][-1]
        assert final.event.task.status in {COMPLETED, FAILED, CANCELLED}


# -- through the gRPC API --------------------------------------------------------------------
def app_settings(nats: NatsServer, tmp_path: Path, db: Database, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats.url,
        "data_dir": tmp_path,
        "database_url": db.url,
        "lease_seconds": 5.0,
        "retry_base_seconds": 0.05,
        "shutdown_grace_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[TaskStoreApp, StoreClient]]:
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}") as client,
    ):
        yield app, client


def bad_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    fields = [field for field, _ in error_details(exc).field_violations]
    assert fields, "INVALID_ARGUMENT without google.rpc.BadRequest details"
    return fields


async def test_grpc_rejects_invalid_create_and_stores_nothing(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (app, client):
        bad_image = image_request(prompt="")
        bad_image.image.resolution = "10x10"
        bad_image.metadata["1bad key"] = "x"
        bad_tts = tts_request()
        bad_tts.tts.speed = 9.0
        bad_tts.tts.response_format = "ogg"
        mismatched = tts_request()
        mismatched.type = IMAGE
        cases = [
            (bad_image, {"image.prompt", "image.resolution"}),
            (bad_tts, {"tts.speed", "tts.response_format"}),
            (mismatched, {"payload"}),
            (task_service_pb2.CreateTaskRequest(), {"type", "payload"}),
            (image_request(request_id="x" * 200), {"request_id"}),
        ]
        for request, expected in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.create_task("t1", request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            fields = bad_fields(err.value)
            assert expected <= set(fields), fields

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_task("t1", bad_image)
        assert any(f.startswith("metadata[") for f in bad_fields(err.value))

        listed = await client.list_tasks("t1", task_service_pb2.ListTasksRequest())
        assert list(listed.tasks) == []
        events = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert (list(events.events), events.head_sequence) == ([], 0)
        assert app.store is not None
        assert await app.store.pending_dispatches() == []
        counts = [await db.count_rows(table) for table in ("tasks", "events", "outbox")]
        assert counts == [0, 0, 0]

        # A bad page token is INVALID_ARGUMENT naming page_token, through the API too.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.list_tasks("t1", task_service_pb2.ListTasksRequest(page_token="%%%"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err.value) == ["page_token"]


async def test_grpc_hides_other_tenants_tasks(nats_server: NatsServer, tmp_path: Path, db: Database) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (_, client):
        created = await client.create_task("alice", image_request())
        task_id = created.id
        for call in (
            client.get_task("bob", task_id),
            client.cancel_task("bob", task_id),
            client.get_task("alice", "task_" + "0" * 32),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bob_list = await client.list_tasks("bob", task_service_pb2.ListTasksRequest())
        assert list(bob_list.tasks) == []
        bob_events = await client.list_events(spb.ListEventsRequest(tenant="bob", task_id=task_id))
        assert list(bob_events.events) == []
        mine = await client.get_task("alice", task_id)
        assert mine.status == QUEUED  # bob's cancel changed nothing


async def test_restart_keeps_tasks_and_continues_sequences(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    settings = app_settings(nats_server, tmp_path, db)
    async with running_app(settings) as (_, client):
        ids = []
        for i in range(3):
            created = await client.create_task("t1", image_request(f"c{i}", request_id=f"r{i}"))
            ids.append(created.id)
        claim = await client.claim_task(ids[0], 1, "w")
        assert claim.outcome == RUN
        await client.report_progress(ids[0], 1, 40, "generating")
        await client.cancel_task("t1", ids[1])
        before = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert before.head_sequence == 6

    async with running_app(settings) as (_, client):
        after = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert list(after.events) == list(before.events)
        assert after.head_sequence == before.head_sequence
        running = await client.get_task("t1", ids[0])
        assert (running.status, running.progress, running.attempt) == (RUNNING, 40, 1)
        cancelled = await client.get_task("t1", ids[1])
        assert cancelled.status == CANCELLED
        # request_id still deduplicates after the restart.
        again = await client.create_task("t1", image_request("c2", request_id="r2"))
        assert again.id == ids[2]
        # The running attempt can still finish, and sequences continue where they stopped.
        done = await client.complete_task(ids[0], 1, image_result())
        assert done.status == COMPLETED
        new = await client.create_task("t1", tts_request())
        events = await client.list_events(
            spb.ListEventsRequest(tenant="t1", after_sequence=before.head_sequence)
        )
        assert [(e.sequence, e.type, e.task.id) for e in events.events] == [
            (7, EV.TASK_EVENT_TYPE_COMPLETED, ids[0]),
            (8, EV.TASK_EVENT_TYPE_QUEUED, new.id),
        ]
        listed = await client.list_tasks("t1", task_service_pb2.ListTasksRequest())
        assert [t.id for t in listed.tasks] == [new.id, *reversed(ids)]


# -- SQLite only -----------------------------------------------------------------------------
async def test_sqlite_file_is_in_wal_mode_after_the_app_ran(nats_server: NatsServer, tmp_path: Path) -> None:
    """SQLite only, by nature: WAL (readers never block the single writer) is a property of the
    SQLite file; PostgreSQL has no journal mode to check. Not parametrized rather than skipped."""
    path = tmp_path / "tasks.db"
    sqlite_db = Database("sqlite", f"sqlite:///{path}", sqlite_count(path))
    async with running_app(app_settings(nats_server, tmp_path, sqlite_db)) as (_, client):
        await client.create_task("t1", image_request())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await sqlite_db.count_rows("tasks") == 1
