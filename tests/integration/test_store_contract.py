"""The task store's contract, run on both backends: a SQLite file and a real PostgreSQL database.

The logic is written once (``charai.task_store``: the lifecycle core decides, the store persists);
these tests hold both backends to the same behaviour: create and idempotency, listing with
metadata filters and pages, the state machine with fencing and lease takeover, retries, cancel,
re-run, the event log (by task, by filter, ``after_sequence``, the head), the envelopes'
``prev_sequence`` chain, the outbox (pending, claims, marks, releases), the sweeper's claims and
re-dispatch, queue positions, migrations, and a restart on the same database. Checks that only
mean something on one backend (SQLite's lane counters, PostgreSQL's GIN index and concurrent
migrators) are at the end, each run on its backend alone on purpose rather than skipped.

Time is the store's injected clock (``rec.clock``, a ``ManualClock``): a test moves it to let a
lease, a retry delay or a claim expire, so nothing here sleeps or depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.core.errors import (
    NotFailedError,
    NotFoundError,
    StaleAttemptError,
    TaskEndedError,
    TaskNotFinishedError,
)
from charai.core.validation import RequestInvalidError
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import numbered
from charai.task_store.backlog import FairConfig
from charai.task_store.commands import ClaimResult
from charai.task_store.postgres_backend import PgTx
from charai.task_store.queries import MAX_PAGE_BYTES
from charai.task_store.reuse import ReuseConfig
from charai.task_store.schema import ENDED, LATEST_VERSION, REUSABLE
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.store import StoreConfig, open_store
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.conftest import eventually
from tests.integration.conftest import Database, Recorded, opened, sqlite_database
from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    DEFER,
    DONE,
    EV,
    FAILED,
    IMAGE,
    QUEUED,
    RUN,
    RUNNING,
    TTS,
    complete_req,
    fail_req,
    image_request,
    tts_request,
)
from tests.pg import PgDatabase


async def claim_when_due(rec: Recorded, task_id: str, worker: str = "w") -> Any:
    """Claims the task, moving the clock past each DEFER (a retry not due yet)."""
    claim = await rec.store.claim(task_id, 1, worker)
    while claim.outcome == DEFER:
        assert 0 < claim.retry_after <= 0.25
        rec.clock.advance(claim.retry_after)
        claim = await rec.store.claim(task_id, 1, worker)
    return claim


# -- create, idempotency, listing ------------------------------------------------------------
async def test_create_queues_a_task_with_its_event_its_job_and_filled_metadata(
    db: Database, rec: Recorded
) -> None:
    store = rec.store
    task, created = await store.create(
        "t1",
        image_request(metadata={"category": "gallery", "characterName": "Set by client"}, costume_id="c_9"),
    )
    assert created
    assert (task.status, task.progress, task.stage, task.attempt, task.queue_position) == (
        QUEUED,
        0,
        "queued",
        0,
        1,
    )
    assert task.id.startswith("task_")
    assert task.image.prompt == "a knight in silver armour"
    assert 0 < rec.clock.now_us() - task.create_time.ToMicroseconds() < 1000  # the store's clock
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
    assert second.queue_position == 1  # another lane
    third, _ = await store.create("t1", image_request())
    assert third.queue_position == 2
    high, _ = await store.create("t1", image_request(priority=task_pb2.PRIORITY_HIGH))
    assert high.queue_position == 1
    assert (await store.get("t1", third.id)).queue_position == 3

    first_events = await rec.events(task.id)
    assert [(e.sequence, e.type) for e in first_events] == [(1, EV.TASK_EVENT_TYPE_QUEUED)]
    assert [(e.sequence, e.type) for e in await rec.events(second.id)] == [(2, EV.TASK_EVENT_TYPE_QUEUED)]
    assert (first_events[0].task.id, first_events[0].task.status) == (task.id, QUEUED)
    # Each create also queued exactly one job in the outbox (same transaction).
    pending = await store.pending_dispatches()
    assert [(r.task_id, r.dispatch_gen, r.subject) for r in pending] == [
        (task.id, 1, "charai.jobs.image.normal"),
        (second.id, 1, "charai.jobs.tts.normal"),
        (third.id, 1, "charai.jobs.image.normal"),
        (high.id, 1, "charai.jobs.image.high"),
    ]
    assert spb.Job.FromString(pending[0].payload).task_id == task.id
    fetched = await store.get("t1", task.id)
    assert (fetched.id, fetched.status) == (task.id, QUEUED)
    with pytest.raises(NotFoundError):
        await store.get("t2", task.id)
    with pytest.raises(NotFoundError):
        await store.get("t1", "task_" + "0" * 32)
    assert await store.tenant_of(task.id) == "t1"
    assert await store.tenant_of("task_nope") is None
    assert await db.count_rows("tasks") == 4


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
    counts = [await db.count_rows(t) for t in ("tasks", "outbox", "events")]
    assert counts == [2, 2, 2]
    tasks, _ = await store.list_tasks("t1", task_service_pb2.ListTasksRequest())
    assert [t.id for t in tasks] == [first.id]


async def test_concurrent_creates_with_one_request_id_make_one_task(db: Database, rec: Recorded) -> None:
    # On PostgreSQL these run on separate pooled connections, truly at once: the unique index and
    # ON CONFLICT DO NOTHING decide, and every caller gets the winner.
    results = await asyncio.gather(
        *(rec.store.create("t1", image_request(request_id="same")) for _ in range(20))
    )
    assert len({task.id for task, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    counts = [await db.count_rows(t) for t in ("tasks", "outbox", "events")]
    assert counts == [1, 1, 1]


async def test_creates_in_one_transaction_fail_alone_and_roll_back_their_own_writes(
    db: Database, rec: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # create_each (the creates of one Exchange call): each create has its own savepoint. A create
    # that fails after writing (here: its queue position, the last step, raises) leaves no task,
    # metadata, event, job or envelope; the ones around it commit, and a request_id repeated in
    # the batch answers the first's task.
    store = rec.store
    position = store.commands._queries.position

    async def failing(tx: Any, task: task_pb2.Task, in_backlog: bool | None = None) -> None:
        if task.metadata.get("boom"):
            raise RuntimeError("position failed")
        await position(tx, task, in_backlog)

    monkeypatch.setattr(store.commands._queries, "position", failing)
    taken, _ = await store.create("t1", image_request(request_id="taken"))
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answers = await store.create_each(
        "t1",
        [
            [(image_request(request_id="a"), "")],
            [(image_request(metadata={"boom": "1"}), "")],
            [(image_request(request_id="a"), "")],
            [(tts_request(request_id="taken"), "")],  # another type for a used request_id
            [(tts_request(metadata={"character": "c2"}), trace), (image_request(request_id="b"), "")],
            # A batch is all or none: its first create is rolled back with its failing second.
            [(image_request(request_id="c"), ""), (image_request(metadata={"boom": "1"}), "")],
        ],
    )
    first, failed, repeated, refused, pair, half = answers
    assert isinstance(first, list) and first[0][1]
    assert isinstance(failed, RuntimeError) and isinstance(half, RuntimeError)
    assert repeated == [(first[0][0], False)]
    assert isinstance(refused, RequestInvalidError)
    assert isinstance(pair, list) and [created for _, created in pair] == [True, True]
    assert pair[0][0].metadata["character"] == "c2"
    made = {taken.id, first[0][0].id, pair[0][0].id, pair[1][0].id}
    counts = [await db.count_rows(t) for t in ("tasks", "outbox", "events")]
    assert counts == [4, 4, 4]
    assert {e.event.task.id for e in rec.envelopes} == made
    assert [e.event.type for e in rec.envelopes] == [EV.TASK_EVENT_TYPE_QUEUED] * 4
    again, created = await store.create("t1", image_request(request_id="c"))
    assert created and again.id not in made  # "c" was rolled back with its batch
    tasks, _ = await store.list_tasks("t1", task_service_pb2.ListTasksRequest(metadata={"boom": "1"}))
    assert tasks == []


async def test_progress_reports_in_one_transaction_are_refused_alone(rec: Recorded) -> None:
    # worker_each with only reports (an Exchange call's reports): each answered as its own report,
    # a stale attempt's refusal leaves the others recorded, and two reports of one task both count.
    store = rec.store
    a, b, c = [(await store.create("t1", image_request()))[0] for _ in range(3)]
    for task in (a, b, c):
        assert (await store.claim(task.id, 1, "w1")).outcome == RUN
    start = len(rec.envelopes)
    answers = await store.worker_each(
        [
            spb.ReportProgressRequest(task_id=task_id, attempt=attempt, progress=progress, stage=stage)
            for task_id, attempt, progress, stage in (
                (b.id, 1, 30, "generating"),
                (a.id, 7, 40, "generating"),  # not a's attempt
                (c.id, 1, 50, "generating"),
                (a.id, 1, 20, "generating"),
                (a.id, 1, 60, "processing"),
            )
        ]
    )
    assert answers[0] == answers[2] == answers[3] == answers[4] == RUNNING
    assert isinstance(answers[1], StaleAttemptError)
    got = {t.id: (await store.get("t1", t.id)) for t in (a, b, c)}
    assert [(got[t.id].progress, got[t.id].stage) for t in (a, b, c)] == [
        (60, "processing"),
        (30, "generating"),
        (50, "generating"),
    ]
    published = [(e.event.task.id, e.event.task.progress) for e in rec.envelopes[start:]]
    assert sorted(published) == sorted([(a.id, 20), (a.id, 60), (b.id, 30), (c.id, 50)])
    # Each envelope chains to the one before it of the same task, also within the call.
    a_events = [e for e in rec.envelopes[start:] if e.event.task.id == a.id]
    assert a_events[1].prev_sequence == a_events[0].event.sequence


async def test_worker_commands_in_one_transaction_answer_as_their_own_commands(rec: Recorded) -> None:
    # worker_each (a worker's claims, reports and outcomes in one Exchange call): each answered as
    # its own command would be, in order; a refused one is rolled back alone; one task's commands
    # keep their order (its report lands before its completion).
    store = rec.store
    a, b, c, d = [(await store.create("t1", image_request()))[0] for _ in range(4)]
    for task in (a, b, d):
        assert (await store.claim(task.id, 1, "w1")).outcome == RUN
    start = len(rec.envelopes)
    answers = await store.worker_each(
        [
            spb.ClaimTaskRequest(task_id=c.id, dispatch_gen=1, worker_id="w2"),
            spb.ReportProgressRequest(task_id=a.id, attempt=1, progress=40, stage="generating"),
            complete_req(a.id, 1),
            spb.ReportProgressRequest(task_id=b.id, attempt=7, progress=40, stage="generating"),
            fail_req(b.id, 1, ErrorKind.PROVIDER_TIMEOUT),
            complete_req(d.id, 2),  # not d's attempt
            spb.ClaimTaskRequest(task_id="task_" + "0" * 32, dispatch_gen=1, worker_id="w2"),
        ]
    )
    claim, report, done, stale, failed, refused, gone = answers
    assert isinstance(claim, ClaimResult) and (claim.outcome, claim.attempt) == (RUN, 1)
    assert claim.task is not None and claim.task.id == c.id
    assert report == RUNNING
    assert isinstance(done, task_pb2.Task) and (done.status, done.progress) == (COMPLETED, 100)
    assert isinstance(stale, StaleAttemptError)
    assert isinstance(failed, tuple) and failed[0] == spb.FAIL_OUTCOME_RETRY and failed[1] > 0
    assert isinstance(refused, StaleAttemptError)
    assert isinstance(gone, ClaimResult) and gone.outcome == DONE
    got = {t.id: (await store.get("t1", t.id)) for t in (a, b, c, d)}
    assert [got[t.id].status for t in (a, b, c, d)] == [COMPLETED, QUEUED, RUNNING, RUNNING]
    published = [(e.event.task.id, e.event.type) for e in rec.envelopes[start:]]
    a_events = [kind for task_id, kind in published if task_id == a.id]
    assert a_events == [EV.TASK_EVENT_TYPE_PROGRESS, EV.TASK_EVENT_TYPE_COMPLETED]
    assert [kind for task_id, kind in published if task_id == d.id] == []  # refused: nothing written
    assert (c.id, EV.TASK_EVENT_TYPE_STARTED) in published


async def test_every_event_published_carries_the_sequence_it_was_stored_under(rec: Recorded) -> None:
    # A unit inserts its events and its jobs' outbox rows and reads back their keys (SQLite: the
    # rowid the key is, not RETURNING). Tasks interleaved in one call, a refused command among
    # them, and a task row (with its trigger) written between the inserts: each published event's
    # sequence, and the chain to the one before it, are those of the stored event.
    store = rec.store
    start = len(rec.envelopes)
    a, b = [(await store.create("t1", image_request()))[0] for _ in range(2)]
    for task in (a, b):
        assert (await store.claim(task.id, 1, "w1")).outcome == RUN
    await store.worker_each(
        [
            spb.ReportProgressRequest(task_id=a.id, attempt=1, progress=30, stage="generating"),
            spb.ReportProgressRequest(task_id=b.id, attempt=9, progress=30, stage="generating"),  # refused
            spb.ReportProgressRequest(task_id=b.id, attempt=1, progress=40, stage="generating"),
            complete_req(a.id, 1),
            spb.ReportProgressRequest(task_id=b.id, attempt=1, progress=50, stage="generating"),
        ]
    )
    published = rec.envelopes[start:]
    for task in (a, b):
        stored = [(e.sequence, e.type, e.task.progress) for e in await rec.events(task.id)]
        mine = [e for e in published if e.event.task.id == task.id]
        assert [(e.event.sequence, e.event.type, e.event.task.progress) for e in mine] == stored
        assert [e.prev_sequence for e in mine] == [0] + [seq for seq, _, _ in stored[:-1]]
    assert len({e.event.sequence for e in published}) == len(published) == 8


async def test_a_command_in_one_transaction_sees_what_the_commands_before_it_wrote(rec: Recorded) -> None:
    # A late progress report after its task's completion, in the same call: refused as it would
    # be alone (the task ended), not decided on the row as it was before the completion (which
    # put the task back to RUNNING and lost the completion). Two reports of one task chain too.
    store = rec.store
    a, b = [(await store.create("t1", image_request()))[0] for _ in range(2)]
    for task in (a, b):
        assert (await store.claim(task.id, 1, "w1")).outcome == RUN
    answers = await store.worker_each(
        [
            complete_req(a.id, 1),
            spb.ReportProgressRequest(task_id=a.id, attempt=1, progress=50, stage="generating"),
            spb.ReportProgressRequest(task_id=b.id, attempt=1, progress=50, stage="generating"),
            spb.ReportProgressRequest(task_id=b.id, attempt=1, progress=30, stage="generating"),
        ]
    )
    assert isinstance(answers[0], task_pb2.Task) and answers[0].status == COMPLETED
    assert isinstance(answers[1], TaskEndedError)
    assert (await store.get("t1", a.id)).status == COMPLETED
    assert (await store.get("t1", b.id)).progress == 50  # progress never goes back
    seqs = [e.sequence for e in await rec.events(b.id)]
    assert seqs == sorted(seqs)


async def test_list_filters_by_metadata_type_status_orders_newest_first_and_pages(rec: Recorded) -> None:
    store = rec.store
    specs = [
        ("char_a", "gallery", IMAGE),
        ("char_a", "voice", TTS),
        ("char_b", "gallery", IMAGE),
        ("char_a", "gallery", IMAGE),
        ("char_b", "voice", TTS),
        ("char_a", "gallery", TTS),
        ("char_a", "gallery", IMAGE),
    ]
    made: list[task_pb2.Task] = []
    for character, category, kind in specs:
        req = image_request(character) if kind == IMAGE else tts_request(character)
        req.metadata["category"] = category
        made.append((await store.create("t1", req))[0])
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
        if (t.metadata["characterId"], t.metadata["category"]) == ("char_a", "gallery")
    ]
    assert len(both) == 4
    assert await ids(metadata={"characterId": "char_a", "category": "gallery"}) == both
    assert await ids(metadata={"characterId": "char_a", "category": "nope"}) == []
    assert await ids(metadata={"nope": "char_a"}) == []
    assert await ids(metadata={"characterId": "char_a", "category": "gallery"}, type=TTS) == [made[5].id]
    assert await ids(type=IMAGE) == [t.id for t in reversed(made) if t.type == IMAGE]
    await store.cancel("t1", made[2].id)
    await store.claim(made[3].id, 1, "w")
    assert await ids(status=CANCELLED) == [made[2].id]
    assert await ids(status=RUNNING) == [made[3].id]
    assert await ids(status=QUEUED, metadata={"characterId": "char_b"}) == [made[4].id]

    # Pages of 3 cover everything once, in order, and the last page has no token.
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
    assert (pages, seen) == (3, newest_first)
    # Tokens combine with a filter.
    found: list[str] = []
    tokens: list[str] = []
    for _ in range(3):
        request = task_service_pb2.ListTasksRequest(
            metadata={"characterId": "char_a"}, page_size=2, page_token=tokens[-1] if tokens else ""
        )
        page, token = await store.list_tasks("t1", request)
        found += [t.id for t in page]
        tokens.append(token)
    assert found == char_a
    assert tokens[1]
    assert tokens[2] == ""
    with pytest.raises(RequestInvalidError) as err:
        await store.list_tasks("t1", task_service_pb2.ListTasksRequest(page_token="not a token!"))
    assert [v.field for v in err.value.violations] == ["page_token"]


async def test_a_page_of_large_tasks_stops_before_its_bytes_limit(rec: Recorded) -> None:
    """150 tasks of about 33 KB stored each (a 16,000-byte prompt, 8 KB of metadata, twice over:
    the payload and the metadata): a page of 500 asked for would be 5 MB; it stops before
    MAX_PAGE_BYTES, and its token goes on, every task once, newest first."""
    store = rec.store
    made = []
    for n in range(150):
        request = image_request(prompt="\U0001f5e1" * 3990 + f"{n:010d}")
        for k in range(15):
            request.metadata[f"k{k:02d}"] = "v" * 500
        made.append((await store.create("t1", request))[0])
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page, token = await store.list_tasks(
            "t1", task_service_pb2.ListTasksRequest(page_size=500, page_token=token)
        )
        assert page
        sizes.append(sum(t.ByteSize() for t in page))
        seen += [t.id for t in page]
        if not token:
            break
    assert len(sizes) >= 2 and max(sizes) <= MAX_PAGE_BYTES, sizes
    assert seen == [t.id for t in reversed(made)]


# -- the state machine -----------------------------------------------------------------------
async def test_claim_progress_complete_and_terminal_is_final(rec: Recorded) -> None:
    store = rec.store
    task, _ = await store.create("t1", image_request())
    claim = await store.claim(task.id, 1, "worker-a")
    assert (claim.outcome, claim.attempt) == (RUN, 1)
    assert claim.task is not None
    assert (claim.task.status, claim.task.attempt, claim.task.progress) == (RUNNING, 1, 10)
    assert 0 < rec.clock.now_us() - claim.task.start_time.ToMicroseconds() < 1000

    assert await store.progress(task.id, 1, 5, "generating") == RUNNING  # clamped up to 10
    assert (await store.get("t1", task.id)).progress == 10
    await store.progress(task.id, 1, 55, "generating")
    await store.progress(task.id, 1, 30, "generating")  # never goes back: no event
    assert (await store.get("t1", task.id)).progress == 55
    await store.progress(task.id, 1, 150, "processing")  # clamped down to 90
    running = await store.get("t1", task.id)
    assert (running.progress, running.stage, running.queue_position) == (90, "processing", 0)

    rec.clock.advance(2.5)
    done = await store.complete(complete_req(task.id, 1))
    assert (done.status, done.progress, done.image_result.image_url) == (COMPLETED, 100, "charai-media:x.png")
    assert 0 < rec.clock.now_us() - done.end_time.ToMicroseconds() < 1000
    assert [e.type for e in await rec.events(task.id)] == [
        EV.TASK_EVENT_TYPE_QUEUED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_PROGRESS,  # 10, stage "generating"
        EV.TASK_EVENT_TYPE_PROGRESS,  # 55
        EV.TASK_EVENT_TYPE_PROGRESS,  # 90 (the 30 changed nothing, so made no event)
        EV.TASK_EVENT_TYPE_COMPLETED,
    ]
    head = (await rec.events(task.id))[-1].sequence
    again = await store.complete(complete_req(task.id, 1))  # the same attempt again (lost ack)
    assert again.status == COMPLETED
    with pytest.raises(TaskEndedError):
        await store.progress(task.id, 1, 95, "processing")
    with pytest.raises(TaskEndedError):
        await store.complete(complete_req(task.id, 2))
    outcome, _, after = await store.fail(fail_req(task.id, 1, ErrorKind.PROVIDER_TIMEOUT))
    assert (outcome, after.status) == (spb.FAIL_OUTCOME_IGNORED, COMPLETED)
    unchanged, was_running = await store.cancel("t1", task.id)
    assert (unchanged, was_running) == (done, False)
    assert (await store.claim(task.id, 1, "worker-b")).outcome == DONE
    events = await rec.events(task.id)
    assert (events[-1].sequence, events[-1].type) == (head, EV.TASK_EVENT_TYPE_COMPLETED)  # nothing after

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
    assert [
        (e.type, e.task.progress, e.task.stage, e.task.HasField("image_result")) for e in events[-2:]
    ] == [
        (EV.TASK_EVENT_TYPE_PROGRESS, 90, "processing", False),  # the result comes with the completion
        (EV.TASK_EVENT_TYPE_COMPLETED, 100, "completed", True),
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


async def test_concurrent_claims_of_one_task_run_it_once(rec: Recorded) -> None:
    task, _ = await rec.store.create("t1", image_request())
    claims = await asyncio.gather(*(rec.store.claim(task.id, 1, f"w{i}") for i in range(10)))
    assert sorted(c.outcome for c in claims) == [RUN] + [DEFER] * 9
    assert [e.type for e in await rec.events(task.id)].count(EV.TASK_EVENT_TYPE_STARTED) == 1


async def test_fencing_after_lease_expiry(db: Database) -> None:
    async with opened(db, lease_seconds=0.5) as rec:
        store, clock = rec.store, rec.clock
        task, _ = await store.create("t1", image_request())
        first = await store.claim(task.id, 1, "worker-a")
        assert (first.outcome, first.attempt) == (RUN, 1)
        clock.advance(0.3)
        await store.progress(task.id, 1, 40, "generating")  # renews the lease
        clock.advance(0.3)
        assert (await store.claim(task.id, 1, "worker-b")).outcome == DEFER  # renewed, still alive
        clock.advance(0.3)
        await store.progress(task.id, 1, 40, "generating")  # no news: renews the lease all the same
        clock.advance(0.3)
        assert (await store.claim(task.id, 1, "worker-b")).outcome == DEFER
        clock.advance(0.21)

        second = await store.claim(task.id, 1, "worker-b")
        assert (second.outcome, second.attempt) == (RUN, 2)
        assert second.task is not None
        assert second.task.attempt == 2
        assert second.task.error.code == task_pb2.ERROR_CODE_WORKER_LOST
        assert second.task.error.retryable

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
        assert (again.status, again.attempt) == (COMPLETED, 2)
        assert len(await rec.events(task.id)) == count  # no second COMPLETED event
        with pytest.raises(TaskEndedError):
            await store.complete(complete_req(task.id, 1))
        types = [e.type for e in await rec.events(task.id)]
        assert types.count(EV.TASK_EVENT_TYPE_STARTED) == 2
        assert types.count(EV.TASK_EVENT_TYPE_COMPLETED) == 1


async def test_claim_defers_while_leased_or_waiting_for_a_retry(rec: Recorded) -> None:
    store, clock = rec.store, rec.clock  # lease 5 s
    task, _ = await store.create("t1", image_request())
    assert (await store.claim(task.id, 1, "a")).outcome == RUN
    clock.advance(0.5)
    deferred = await store.claim(task.id, 1, "b")
    assert (deferred.outcome, deferred.attempt) == (DEFER, 0)
    assert deferred.retry_after == pytest.approx(4.5, abs=1e-3)  # what is left of the 5 s lease

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
    next_at = waiting.next_attempt_time.ToMicroseconds()
    assert abs(next_at - (clock.now_us() + delay * 1e6)) < 1000
    clock.advance(1.0)
    not_yet = await store.claim(task.id, 1, "b")
    assert not_yet.outcome == DEFER
    assert not_yet.retry_after == pytest.approx((next_at - clock.now_us()) / 1e6, abs=1e-3)
    assert (await store.get("t1", task.id)).status == QUEUED
    clock.advance(not_yet.retry_after)
    assert (await store.claim(task.id, 1, "b")).attempt == 2


async def test_lost_worker_exhausts_attempts_and_fails(db: Database) -> None:
    retry = RetryPolicy(base=0.05, cap=0.2, max_attempts=2)
    async with opened(db, lease_seconds=0.2, max_attempts=2, retry=retry) as rec:
        store = rec.store
        task, _ = await store.create("t1", image_request())
        assert (await store.claim(task.id, 1, "a")).attempt == 1
        rec.clock.advance(0.3)
        assert (await store.claim(task.id, 1, "b")).attempt == 2
        rec.clock.advance(0.3)
        assert (await store.claim(task.id, 1, "c")).outcome == DONE
        failed = await store.get("t1", task.id)
        assert (failed.status, failed.error.code, failed.attempt) == (
            FAILED,
            task_pb2.ERROR_CODE_WORKER_LOST,
            2,
        )
        assert not failed.error.retryable
        assert [e.type for e in await rec.events(task.id)][-1] == EV.TASK_EVENT_TYPE_FAILED


async def test_fail_retries_retryable_kinds_up_to_their_limit(rec: Recorded) -> None:
    store = rec.store
    # PROVIDER_BAD_RESPONSE allows 2 retries: attempts 1 and 2 are retried, attempt 3 fails.
    task, _ = await store.create("t1", image_request())
    for attempt in (1, 2, 3):
        claim = await claim_when_due(rec, task.id)
        assert (claim.outcome, claim.attempt) == (RUN, attempt)
        outcome, delay, after = await store.fail(
            fail_req(task.id, attempt, ErrorKind.PROVIDER_BAD_RESPONSE, f"garbage {attempt}")
        )
        if attempt < 3:
            assert (outcome, after.status, after.stage, after.progress) == (
                spb.FAIL_OUTCOME_RETRY,
                QUEUED,
                "waiting_retry",
                10,  # a retry shows in stage, attempt and its event: the bar never goes back
            )
            assert 0 < delay <= 0.2
            assert after.HasField("next_attempt_time")
            assert (after.error.code, after.error.message) == (
                task_pb2.ERROR_CODE_PROVIDER_BAD_RESPONSE,
                f"garbage {attempt}",
            )
            assert after.error.retryable
        else:
            assert (outcome, after.status, after.error.message) == (
                spb.FAIL_OUTCOME_FAILED,
                FAILED,
                "garbage 3",
            )
            assert not after.error.retryable
            assert after.HasField("end_time")
    events = await rec.events(task.id)
    assert [e.type for e in events] == [
        EV.TASK_EVENT_TYPE_QUEUED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_RETRY_SCHEDULED,
        EV.TASK_EVENT_TYPE_STARTED,
        EV.TASK_EVENT_TYPE_FAILED,
    ]
    retry_events = [e for e in events if e.type == EV.TASK_EVENT_TYPE_RETRY_SCHEDULED]
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
        assert (outcome, after.status, after.error.code, after.attempt) == (
            spb.FAIL_OUTCOME_FAILED,
            FAILED,
            int(kind),
            1,
        )


async def test_cancel_queued_and_running_tasks(rec: Recorded) -> None:
    store = rec.store
    queued, _ = await store.create("t1", image_request())
    running, _ = await store.create("t1", image_request())
    await store.claim(running.id, 1, "w")
    with pytest.raises(NotFoundError):
        await store.cancel("t2", queued.id)  # another tenant's task
    cancelled, was_running = await store.cancel("t1", queued.id)
    assert (cancelled.status, was_running, cancelled.HasField("end_time")) == (CANCELLED, False, True)
    cancelled, was_running = await store.cancel("t1", running.id)
    assert (cancelled.status, was_running) == (CANCELLED, True)
    for task_id in (queued.id, running.id):
        events = await rec.events(task_id)
        assert (events[-1].type, events[-1].task.status) == (EV.TASK_EVENT_TYPE_CANCELLED, CANCELLED)
    # A job delivered afterwards finds nothing to do; the worker still holding it is refused.
    assert (await store.claim(queued.id, 1, "w")).outcome == DONE
    with pytest.raises(TaskEndedError):
        await store.progress(running.id, 1, 50, "generating")


async def test_retry_re_runs_only_a_failed_task_of_its_tenant_with_a_new_job(
    db: Database, rec: Recorded
) -> None:
    store = rec.store
    task, _ = await store.create("t1", image_request())
    await store.claim(task.id, 1, "w")
    with pytest.raises(NotFailedError):
        await store.retry("t1", task.id)  # running
    await store.fail(fail_req(task.id, 1, ErrorKind.CONTENT_REJECTED, "no"))
    with pytest.raises(NotFoundError):
        await store.retry("t2", task.id)
    rows = await store.claim_dispatches("relay")
    await store.mark_dispatched([(r, 1) for r in rows])
    again = await store.retry("t1", task.id)
    assert (again.status, again.progress, again.stage, again.max_attempts) == (QUEUED, 10, "queued", 7)
    assert not again.HasField("error")
    assert not again.HasField("end_time")
    assert [(r.task_id, r.dispatch_gen) for r in await store.pending_dispatches()] == [(task.id, 2)]
    assert [e.type for e in await rec.events(task.id)][-2:] == [
        EV.TASK_EVENT_TYPE_FAILED,
        EV.TASK_EVENT_TYPE_QUEUED,
    ]
    claim = await store.claim(task.id, 2, "w")
    assert (claim.outcome, claim.attempt) == (RUN, 2)
    done = await store.complete(complete_req(task.id, 2))
    with pytest.raises(NotFailedError):
        await store.retry("t1", done.id)


# -- the event log ---------------------------------------------------------------------------
async def test_events_by_task_and_by_filter_after_sequence(rec: Recorded) -> None:
    store = rec.store
    a, _ = await store.create("t1", image_request("char_a", metadata={"category": "gallery"}))
    b, _ = await store.create("t1", image_request("char_b", metadata={"category": "gallery"}))
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
    two_keys, _ = await store.list_events(
        spb.ListEventsRequest(tenant="t1", metadata={"characterId": "char_a", "category": "gallery"})
    )
    assert {e.task.id for e in two_keys} == {a.id}
    assert len(two_keys) == 4  # queued, started, progress, completed
    image_only, _ = await store.list_events(
        spb.ListEventsRequest(
            tenant="t1", metadata={"characterId": "char_a"}, type=IMAGE, after_sequence=cursor
        )
    )
    assert [e.task.id for e in image_only] == [a.id, a.id]
    everything, head = await store.list_events(spb.ListEventsRequest(tenant="t1"))
    assert len(everything) == 9  # 3 queued, 2 started, 2 progress, cancelled, completed
    assert {e.task.id for e in everything} == {a.id, b.id, c.id}
    assert head == 10  # t2's queued event counts towards the head, not towards t1's events
    seqs = [e.sequence for e in everything]
    assert seqs == sorted(seqs)
    limited, _ = await store.list_events(spb.ListEventsRequest(tenant="t1", after_sequence=cursor, limit=2))
    assert [e.sequence for e in limited] == [s for s in seqs if s > cursor][:2]
    nothing, head_again = await store.list_events(spb.ListEventsRequest(tenant="t1", after_sequence=head))
    assert (nothing, head_again) == ([], head)


async def test_a_page_of_events_stops_before_max_bytes_and_says_more_follow(rec: Recorded) -> None:
    """Each event carries its whole task: with ``max_bytes`` a page stops before that many bytes
    (at least one event) and says ``more``; read on from its last event, the pages hold every
    event once, in order. Without it (a gateway of an earlier release) nothing changes."""
    store = rec.store
    for n in range(12):
        await store.create("t1", image_request(prompt="\U0001f5e1" * 3990 + f"{n:010d}"))
    everything, head = await store.list_events(spb.ListEventsRequest(tenant="t1"))
    assert len(everything) == 12 and sum(e.task.ByteSize() for e in everything) > 12 * 16_000
    seen: list[int] = []
    pages = []
    after = 0
    while True:
        request = spb.ListEventsRequest(tenant="t1", after_sequence=after, max_bytes=50_000)
        events, page_head, more = await store.events_page(request)
        assert events and page_head == head
        pages.append(len(events))
        assert sum(e.task.ByteSize() for e in events) <= 50_000 or len(events) == 1
        seen += [e.sequence for e in events]
        after = events[-1].sequence
        if not more:
            break
    assert seen == [e.sequence for e in everything] and len(pages) >= 4, pages
    # One event larger than the cap still comes, alone.
    events, _, more = await store.events_page(spb.ListEventsRequest(tenant="t1", max_bytes=10))
    assert len(events) == 1 and more
    assert (await store.events_page(spb.ListEventsRequest(tenant="t1")))[2] is False


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

    async def report(n: int, task_id: str) -> None:
        try:
            await store.progress(task_id, 1, 20 + n, "generating")
        except TaskEndedError:
            # Cancelled first (PostgreSQL runs these at once): the report is refused, as it must be.
            assert task_id in ids[::3]

    await asyncio.gather(
        *(report(n, i) for n, i in enumerate(ids)),
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


# -- outbox and sweeper ----------------------------------------------------------------------
async def test_outbox_claims_marks_and_releases(db: Database, rec: Recorded) -> None:
    store = rec.store
    tasks = [(await store.create("t1", image_request()))[0] for _ in range(5)]
    mine = await store.claim_dispatches("relay-a", limit=3)
    assert [r.task_id for r in mine] == [t.id for t in tasks[:3]]
    theirs = await store.claim_dispatches("relay-b")
    assert [r.task_id for r in theirs] == [t.id for t in tasks[3:]]  # never the rows a holds
    assert await store.claim_dispatches("relay-c") == []
    assert [r.id for r in await store.claim_dispatches("relay-a")] == [
        r.id for r in mine
    ]  # a retries its own
    assert len(await store.pending_dispatches()) == 5  # a peek sees claimed rows too

    await store.mark_dispatched([(row, 100 + n) for n, row in enumerate(mine[:2])])
    await store.release_dispatches("relay-b")
    after_release = await store.claim_dispatches("relay-c")
    assert [r.task_id for r in after_release] == [t.id for t in tasks[3:]]
    assert [r.task_id for r in await store.pending_dispatches()] == [t.id for t in tasks[2:]]
    assert await db.count_rows("outbox") == 3


async def test_a_claim_records_the_jobs_sent_before_it_even_when_it_finds_none(
    db: Database, rec: Recorded
) -> None:
    """A relay's next claim deletes the rows it published (one write per batch): first, so its
    own published rows are not claimed again, and also when it finds nothing more to claim."""
    store = rec.store
    tasks = [(await store.create("t1", image_request()))[0] for _ in range(3)]
    first = await store.claim_dispatches("relay", limit=2)
    second = await store.claim_dispatches("relay", sent=[(r, 10 + n) for n, r in enumerate(first)])
    assert [r.task_id for r in second] == [tasks[2].id]
    assert [r.task_id for r in await store.pending_dispatches()] == [tasks[2].id]
    assert await store.claim_dispatches("relay", sent=[(second[0], 12)]) == []
    assert await db.count_rows("outbox") == 0
    rec.clock.advance(0.01)
    # Each job's stream sequence was recorded with it (the sweeper checks the stream by it).
    stale = sorted(await store.stale_dispatches(0.0))
    assert stale == sorted((t.id, 1, 10 + n) for n, t in enumerate(tasks))


async def test_release_records_the_jobs_sent_and_gives_back_the_rest(db: Database, rec: Recorded) -> None:
    store = rec.store
    tasks = [(await store.create("t1", image_request()))[0] for _ in range(3)]
    rows = await store.claim_dispatches("relay")
    await store.release_dispatches("relay", sent=[(rows[0], 7)])
    assert [r.task_id for r in await store.claim_dispatches("other")] == [t.id for t in tasks[1:]]
    rec.clock.advance(0.01)
    assert await store.stale_dispatches(0.0) == [(tasks[0].id, 1, 7)]


async def test_expired_outbox_claims_go_to_another_relay(db: Database) -> None:
    async with opened(db, outbox_claim_seconds=0.2) as rec:
        task, _ = await rec.store.create("t1", image_request())
        assert [r.task_id for r in await rec.store.claim_dispatches("dead-relay")] == [task.id]
        assert await rec.store.claim_dispatches("live-relay") == []
        rec.clock.advance(0.19)
        assert await rec.store.claim_dispatches("live-relay") == []  # a claim lasts its whole time
        rec.clock.advance(0.02)
        assert [r.task_id for r in await rec.store.claim_dispatches("live-relay")] == [task.id]


async def test_a_handed_off_job_is_left_to_its_relay_until_its_short_claim_expires(db: Database) -> None:
    async with opened(db, hand_off_claim_seconds=5.0) as rec:
        handed: list[Any] = []
        rec.store.hand_off("relay-a", handed.extend)
        task, _ = await rec.store.create("t1", image_request())
        assert [r.task_id for r in handed] == [task.id]  # after commit, in memory
        assert await rec.store.claim_dispatches("relay-a") == []  # not even its owner claims it
        assert await rec.store.claim_dispatches("relay-b") == []
        rec.clock.advance(5.001)  # the relay died before publishing: anyone may now
        assert [r.id for r in await rec.store.claim_dispatches("relay-b")] == [handed[0].id]


async def test_stale_dispatches_are_claimed_once_and_redispatched_by_generation(rec: Recorded) -> None:
    store, clock = rec.store, rec.clock
    waiting, _ = await store.create("t1", image_request())
    leased, _ = await store.create("t1", image_request())
    ended, _ = await store.create("t1", image_request())
    unsent, _ = await store.create("t1", image_request())
    rows = await store.claim_dispatches("relay")
    await store.mark_dispatched([(r, n + 1) for n, r in enumerate(rows) if r.task_id != unsent.id])
    await store.claim(leased.id, 1, "w")
    await store.cancel("t1", ended.id)
    assert await store.stale_dispatches(60.0) == []  # published just now
    clock.advance(0.2)
    stale = await store.stale_dispatches(0.1)
    assert stale == [(waiting.id, 1, 1)]  # not the live lease, the ended task or the unsent job
    assert await store.stale_dispatches(0.1) == []  # claimed: nobody looks again for a while
    clock.advance(0.2)
    assert await store.stale_dispatches(0.1) == [(waiting.id, 1, 1)]

    assert await store.redispatch(waiting.id, 1)
    assert not await store.redispatch(waiting.id, 1)  # another sweeper got there first
    assert not await store.redispatch(ended.id, 1)
    jobs = [(r.task_id, r.dispatch_gen) for r in await store.pending_dispatches()]
    assert jobs == [(unsent.id, 1), (waiting.id, 2)]
    assert await store.stale_dispatches(0.0) == []  # its new job waits in the outbox
    await store.touch_dispatch([waiting.id])
    assert (await store.get("t1", waiting.id)).status == QUEUED
    # A running task whose lease expired is a suspect too (its job may be gone with its worker).
    clock.advance(10.0)
    assert [s[0] for s in await store.stale_dispatches(0.1)] == [leased.id]


# -- queue position --------------------------------------------------------------------------
async def test_queue_position_follows_claims_retries_and_cancels(db: Database) -> None:
    """Position = 1 + queued tasks of the type ahead (higher priority, or same and older), with
    every job released (held tasks: ``test_fair_share.py``)."""
    async with opened(db, lease_seconds=5.0) as rec:
        store = rec.store
        normal = [(await store.create("t1", image_request()))[0] for _ in range(4)]
        assert [t.queue_position for t in normal] == [1, 2, 3, 4]
        high, _ = await store.create("t2", image_request(priority=task_pb2.PRIORITY_HIGH))
        low, _ = await store.create("t1", image_request(priority=task_pb2.PRIORITY_LOW))
        other, _ = await store.create("t1", tts_request())
        assert (high.queue_position, low.queue_position, other.queue_position) == (1, 6, 1)

        async def positions() -> list[int]:
            ordered = [("t2", high), *(("t1", t) for t in normal), ("t1", low)]
            return [(await store.get(tenant, t.id)).queue_position for tenant, t in ordered]

        assert await positions() == [1, 2, 3, 4, 5, 6]
        assert (await store.claim(normal[0].id, 1, "w")).outcome == RUN
        assert await positions() == [1, 0, 2, 3, 4, 5]
        await store.cancel("t1", normal[2].id)
        assert await positions() == [1, 0, 2, 0, 3, 4]
        # A failed attempt waiting for its retry is queued again, in its place by creation time.
        outcome, _, _ = await store.fail(fail_req(normal[0].id, 1, ErrorKind.PROVIDER_TIMEOUT))
        assert outcome == spb.FAIL_OUTCOME_RETRY
        assert await positions() == [1, 2, 3, 0, 4, 5]
        listed, _ = await store.list_tasks("t1", task_service_pb2.ListTasksRequest(type=IMAGE))
        assert [t.queue_position for t in listed] == [5, 4, 0, 3, 2]  # newest first
        # A request_id repeated after the queue moved answers the task's current place.
        keyed, _ = await store.create("t1", image_request(request_id="k"))
        assert keyed.queue_position == 5  # ahead of the low-priority task
        await store.claim(high.id, 1, "w")
        again, created = await store.create("t1", image_request(request_id="k"))
        assert (again.id, created, again.queue_position) == (keyed.id, False, 4)


async def test_sqlite_the_lane_counters_and_queue_index_of_an_older_schema_are_dropped(
    tmp_path: Path,
) -> None:
    """A database of schema 9 (lane counters kept by triggers, which nothing read any more, and
    the queue-order index ``tasks_queue``) loses its counters and their triggers at schema 10 and
    the index at 11, which indexes the running tasks instead; its queued tasks keep their places,
    and new creates, claims and cancels work without them."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db) as rec:
        clock = rec.clock
        made = [(await rec.store.create("t1", image_request()))[0] for _ in range(3)]
        await rec.store.claim(made[0].id, 1, "w")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'lane_counts'").fetchall() == []
        # Schema 9 as it was: the counters and their triggers (migration 3), counted from the tasks.
        conn.execute(
            "CREATE TABLE lane_counts (type INTEGER NOT NULL, priority INTEGER NOT NULL,"
            " queued INTEGER NOT NULL, PRIMARY KEY (type, priority)) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO lane_counts SELECT type, priority, COUNT(*) FROM tasks WHERE status = 1"
            " GROUP BY type, priority"
        )
        conn.execute(
            "CREATE TRIGGER tasks_queued_insert AFTER INSERT ON tasks WHEN NEW.status = 1 BEGIN"
            " UPDATE lane_counts SET queued = queued + 1 WHERE type = NEW.type; END"
        )
        conn.execute(
            "CREATE TRIGGER tasks_queued_update AFTER UPDATE OF status ON tasks BEGIN"
            " UPDATE lane_counts SET queued = queued - 1 WHERE OLD.status = 1; END"
        )
        conn.execute(
            "CREATE TRIGGER tasks_queued_delete AFTER DELETE ON tasks WHEN OLD.status = 1 BEGIN"
            " UPDATE lane_counts SET queued = queued - 1; END"
        )
        conn.execute("DROP INDEX tasks_running")
        conn.execute("CREATE INDEX tasks_queue ON tasks (type, status, priority, create_time, id)")
        conn.execute("DELETE FROM schema_version WHERE version >= 10")
        conn.commit()
    async with opened(db, clock) as rec:
        assert [(await rec.store.get("t1", t.id)).queue_position for t in made] == [0, 1, 2]
        newest, _ = await rec.store.create("t1", image_request())
        assert newest.queue_position == 3
        assert (await rec.store.claim(made[1].id, 1, "w")).outcome == RUN
        await rec.store.cancel("t1", made[2].id)
        assert (await rec.store.get("t1", newest.id)).queue_position == 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = (
            "SELECT name FROM sqlite_master WHERE name IN ('lane_counts', 'tasks_queue')"
            " OR (type = 'trigger' AND tbl_name = 'tasks')"  # usage_records has one (migration 18)
        )
        assert conn.execute(names).fetchall() == []
        # The running tasks of a type and tenant (a waiting tenant's first turn) from the index alone.
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM tasks WHERE type = 1 AND status = 2 AND tenant = 't1' LIMIT 1"
        ).fetchall()
        assert "COVERING INDEX tasks_running" in plan[0][3]
        running = conn.execute("SELECT id FROM tasks WHERE type = ? AND status = 2", (int(IMAGE),)).fetchall()
        assert sorted(running) == sorted([(made[0].id,), (made[1].id,)])
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (LATEST_VERSION,)


def row_updates(conn: sqlite3.Connection, of: str = "") -> Callable[[], list[str]]:
    """Records, by a trigger, the id of each ``tasks`` row an UPDATE writes (``of``: an UPDATE
    that names one of these columns); returns a reader of the ids, in order."""
    table = "row_updates_" + "".join(c if c.isalnum() else "_" for c in of)
    columns = f"OF {of} " if of else ""
    conn.execute(f"CREATE TABLE {table} (task_id TEXT)")
    conn.execute(
        f"CREATE TRIGGER {table}_trigger AFTER UPDATE {columns}ON tasks"
        f" BEGIN INSERT INTO {table} VALUES (new.id); END"
    )
    conn.commit()
    return lambda: [str(r[0]) for r in conn.execute(f"SELECT task_id FROM {table} ORDER BY rowid")]


def _back_to_schema(path: Path, version: int, *statements: str) -> None:
    """Turns the SQLite database at ``path`` back into an older schema's: runs ``statements``
    (undoing what migration ``version`` and later ones did), then forgets those migrations, so
    the next start applies them again."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.execute("DELETE FROM schema_version WHERE version >= ?", (version,))
        conn.commit()


async def test_sqlite_the_sweep_index_holds_the_dispatched_jobs_of_unfinished_tasks(tmp_path: Path) -> None:
    """``tasks_dispatched`` (migration 12) holds a task from its job's dispatch (its entry into
    the outbox, migration 15) to its end, and the lost-job sweep reads it once the job has left
    the outbox. The relay's record of the publication writes the stream sequence alone (no
    indexed column), and leaves the row of a task that ended first (a quick job) unwritten. A
    database of schema 11 (the index over every task) gets the partial one."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db):
        pass
    _back_to_schema(  # schema 11's index
        path,
        12,
        "DROP INDEX tasks_dispatched",
        "CREATE INDEX tasks_dispatched ON tasks (status, dispatched_at)",
    )
    async with opened(db) as rec:
        store = rec.store
        with contextlib.closing(sqlite3.connect(path)) as conn:
            publication_writes = row_updates(conn, "stream_seq")
            dispatch_writes = row_updates(conn, "dispatched_at")

            def indexed() -> list[str]:
                rows = conn.execute(
                    "SELECT id FROM tasks INDEXED BY tasks_dispatched"
                    " WHERE status IN (1, 2) AND dispatched_at IS NOT NULL ORDER BY dispatched_at"
                ).fetchall()
                return [str(r[0]) for r in rows]

            def published(task_id: str) -> tuple[Any, ...]:
                return tuple(
                    conn.execute(
                        "SELECT stream_seq, dispatched_at IS NOT NULL FROM tasks WHERE id = ?", (task_id,)
                    ).fetchone()
                )

            slow, _ = await store.create("t1", image_request())
            quick, _ = await store.create("t1", image_request())
            assert indexed() == [slow.id, quick.id]  # dispatched: their jobs are in the outbox
            rec.clock.advance(3600)
            assert await store.stale_dispatches(60) == []  # not published yet: not lost either
            rows = {row.task_id: row for row in await store.pending_dispatches()}
            await store.mark_dispatched([(rows[slow.id], 7)])
            assert published(slow.id) == (7, 1)
            assert (await store.claim(quick.id, 1, "w")).outcome == RUN
            await store.complete(complete_req(quick.id, 1))
            await store.mark_dispatched([(rows[quick.id], 8)])  # recorded after the task ended
            assert published(quick.id) == (None, 1)
            assert publication_writes() == [slow.id]
            assert dispatch_writes() == []  # the record moved no index entry
            assert indexed() == [slow.id]
            assert await store.pending_dispatches() == []
            plan = conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE status IN (1, 2) AND dispatched_at IS NOT NULL"
                " AND dispatched_at < 5 ORDER BY dispatched_at LIMIT 10"
            ).fetchall()
            assert "INDEX tasks_dispatched" in " ".join(str(r[3]) for r in plan)
            assert [s[0] for s in await store.stale_dispatches(60)] == [slow.id]  # the sweep finds it
            assert (await store.claim(slow.id, 1, "w")).outcome == RUN
            await store.complete(complete_req(slow.id, 1))
            assert indexed() == []  # ended: out of the index


async def test_sqlite_a_job_in_the_outbox_at_migration_15_is_swept_once_published_and_lost(
    tmp_path: Path,
) -> None:
    """Migration 15: an unfinished task of an older schema whose job was not recorded as published
    yet (no dispatch time: the old relay set it with the sequence) gets its time, so the sweep
    finds it once the new relay's record (the sequence alone) takes its job out of the outbox;
    held and ended tasks keep none."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db) as rec:
        pending, _ = await rec.store.create("t1", image_request())
        held, _ = await rec.store.create("t1", image_request())
        ended, _ = await rec.store.create("t1", image_request())
        await rec.store.cancel("t1", ended.id)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # schema 14: dispatched at the record
        conn.execute("UPDATE tasks SET dispatched_at = NULL")
        conn.execute("UPDATE tasks SET held = 1 WHERE id = ?", (held.id,))
        conn.execute("DELETE FROM schema_version WHERE version >= 15")
        conn.commit()
    async with opened(db) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            dated = dict(conn.execute("SELECT id, dispatched_at = update_time FROM tasks").fetchall())
        assert dated == {pending.id: 1, held.id: None, ended.id: None}
        rows = {row.task_id: row for row in await rec.store.pending_dispatches()}
        await rec.store.mark_dispatched([(rows[pending.id], 7)])
        rec.clock.advance(3600)
        assert await rec.store.stale_dispatches(60) == [(pending.id, 1, 7)]


async def test_sqlite_migration_16_keeps_the_metadata_rows_in_a_table_without_rowid(tmp_path: Path) -> None:
    """Migration 16: ``task_metadata`` of an older schema (a rowid table with its primary key in
    an index of its own) becomes a table WITHOUT ROWID keeping every row; filters by metadata and
    a delete still find them, and a create after it writes one b-tree less per key."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db) as rec:
        kept, _ = await rec.store.create("t1", image_request("char_a", metadata={"category": "gallery"}))
        other, _ = await rec.store.create("t1", image_request("char_b"))
    table = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'task_metadata'"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # schema 15's rowid table
        assert "WITHOUT ROWID" in conn.execute(table).fetchone()[0]
        conn.execute("ALTER TABLE task_metadata RENAME TO task_metadata_v15")
        conn.execute(
            "CREATE TABLE task_metadata (task_id TEXT NOT NULL, tenant TEXT NOT NULL, key TEXT NOT NULL,"
            " value TEXT NOT NULL, PRIMARY KEY (task_id, key))"
        )
        conn.execute("INSERT INTO task_metadata SELECT task_id, tenant, key, value FROM task_metadata_v15")
        conn.execute("DROP TABLE task_metadata_v15")
        conn.execute("CREATE INDEX task_metadata_kv ON task_metadata (tenant, key, value, task_id)")
        conn.execute("DELETE FROM schema_version WHERE version >= 16")
        conn.commit()
        rows = sorted(conn.execute("SELECT * FROM task_metadata").fetchall())
        assert (kept.id, "t1", "category", "gallery") in rows and {r[0] for r in rows} == {kept.id, other.id}
        assert "WITHOUT ROWID" not in conn.execute(table).fetchone()[0]

    async def listed(**metadata: str) -> list[str]:
        tasks, _ = await rec.store.list_tasks("t1", task_service_pb2.ListTasksRequest(metadata=metadata))
        return [t.id for t in tasks]

    async with opened(db) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert "WITHOUT ROWID" in conn.execute(table).fetchone()[0]
            assert sorted(conn.execute("SELECT * FROM task_metadata").fetchall()) == rows
            plan = conn.execute(
                "EXPLAIN QUERY PLAN SELECT task_id FROM task_metadata WHERE tenant = 't1' AND key = 'k'"
                " AND value = 'v'"
            ).fetchall()
            assert "INDEX task_metadata_kv" in " ".join(str(r[3]) for r in plan)
        assert await listed(category="gallery", characterId="char_a") == [kept.id]
        newer, _ = await rec.store.create("t1", image_request("char_a", metadata={"category": "gallery"}))
        assert await listed(category="gallery") == [newer.id, kept.id]
        await rec.store.cancel("t1", kept.id)
        assert await rec.store.delete("t1", kept.id)
        assert await listed(characterId="char_a") == [newer.id]
        assert await listed(characterId="char_b") == [other.id]


async def test_sqlite_the_reuse_index_of_an_older_schema_holds_running_and_completed_tasks_only(
    tmp_path: Path,
) -> None:
    """Migration 14: ``tasks_reuse`` loses its queued, failed and cancelled tasks (a lookup reads
    running and completed twins only); a claim puts a task in it, and a twin is still found."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db, reuse=LIFE_REUSE) as rec:
        first, _ = await rec.store.create("t1", tts_request("char_twin"))
    _back_to_schema(  # schema 13's index
        path,
        14,
        "DROP INDEX tasks_reuse",
        "CREATE INDEX tasks_reuse ON tasks (tenant, reuse_key, status, update_time)"
        " WHERE reuse_key IS NOT NULL",
    )
    async with opened(db, rec.clock, reuse=LIFE_REUSE) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:

            def indexed() -> int:
                count = "SELECT COUNT(*) FROM tasks INDEXED BY tasks_reuse"
                count += f" WHERE reuse_key IS NOT NULL AND {REUSABLE}"
                return int(conn.execute(count).fetchone()[0])

            assert indexed() == 0  # queued
            assert (await rec.store.claim(first.id, 1, "w")).outcome == RUN
            assert indexed() == 1
            await rec.store.complete(complete_req(first.id, 1))
            twin, _ = await rec.store.create("t1", tts_request("char_twin"))
            assert indexed() == 1
            assert (await rec.store.claim(twin.id, 1, "w")).outcome == spb.CLAIM_OUTCOME_REUSED
            assert indexed() == 2


async def test_sqlite_migration_17_conditions_the_ended_and_reuse_indexes_on_status_ranges(
    tmp_path: Path,
) -> None:
    """Migration 17: ``tasks_ended`` and ``tasks_reuse`` of an older schema (conditioned on
    ``status IN`` lists) are built again on ranges of the same statuses and keep their tasks: the
    retention sweep's candidates are read from ``tasks_ended`` and a twin is still reused."""
    path = tmp_path / "tasks.db"
    db = sqlite_database(path)
    async with opened(db, reuse=LIFE_REUSE) as rec:
        done, _ = await rec.store.create("t1", tts_request("char_twin"))
        assert (await rec.store.claim(done.id, 1, "w")).outcome == RUN
        await rec.store.complete(complete_req(done.id, 1))
    index = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?"
    _back_to_schema(  # schema 16's indexes
        path,
        17,
        "DROP INDEX tasks_ended",
        "CREATE INDEX tasks_ended ON tasks (update_time) WHERE status IN (3, 4, 5)",
        "DROP INDEX tasks_reuse",
        "CREATE INDEX tasks_reuse ON tasks (tenant, reuse_key, status, update_time)"
        " WHERE reuse_key IS NOT NULL AND status IN (2, 3)",
    )
    async with opened(db, rec.clock, reuse=LIFE_REUSE) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for name in ("tasks_ended", "tasks_reuse"):
                assert " IN (" not in conn.execute(index, (name,)).fetchone()[0]
            assert "BETWEEN 3 AND 5" in conn.execute(index, ("tasks_ended",)).fetchone()[0]
            plan = conn.execute(
                f"EXPLAIN QUERY PLAN SELECT tenant FROM tasks WHERE {ENDED} AND update_time < 1"
                " ORDER BY update_time"
            ).fetchall()
            assert "INDEX tasks_ended" in " ".join(str(r[3]) for r in plan)
        rec.clock.advance(60)
        assert [t.id for _, t in await rec.store.ended_before(rec.clock.now_us())] == [done.id]
        twin, _ = await rec.store.create("t1", tts_request("char_twin"))
        assert (await rec.store.claim(twin.id, 1, "w")).outcome == spb.CLAIM_OUTCOME_REUSED


class _Recording:
    """The database thread's connection, recording each statement with its first parameters."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.seen: dict[str, tuple[Any, ...]] = {}

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self.seen.setdefault(sql, tuple(args))
        return self._conn.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        if rows:
            self.seen.setdefault(sql, tuple(rows[0]))
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def _a_task_life(rec: Recorded) -> None:
    """Held and released creates (one repeated by its request_id), the relay's records, a claim,
    a report, a retry, a completion, a release, a cancel, reads, the queue's statistics, the
    lost-job sweep and the retention sweep's candidates (``FairConfig(buffer=1)``)."""
    store = rec.store
    first, _ = await store.create("t1", tts_request("char_plan"))
    held = [(await store.create(t, image_request()))[0] for t in ("t1", "t2")]
    await store.create_many("t2", [image_request(request_id="r1"), image_request()])
    await store.create("t2", image_request(request_id="r1"))
    await store.mark_dispatched([(row, 1) for row in await store.pending_dispatches()])
    assert (await store.claim(first.id, 1, "w")).outcome == RUN
    await store.progress(first.id, 1, 40, "generating")
    await store.fail(fail_req(first.id, 1, ErrorKind.PROVIDER_TIMEOUT))
    claim = await claim_when_due(rec, first.id)
    await store.complete(complete_req(first.id, claim.attempt))
    await store.release_held(IMAGE)
    await store.cancel("t2", held[1].id)
    await store.get("t1", held[0].id)
    await store.list_tasks("t1", task_service_pb2.ListTasksRequest())
    await store.queue_stats()
    rec.clock.advance(3600)
    await store.stale_dispatches(60)
    await store.ended_before(rec.clock.now_us())
    await store.shared_media("t1", first.id)  # a delete's look at the key's other tasks


#: Reuse on in a task's life (:func:`_a_task_life`), so claims look for twins.
LIFE_REUSE = ReuseConfig(ttl_seconds=3600.0)

#: A reuse lookup's condition: it must read ``tasks_reuse``, not every task of the tenant.
_BY_REUSE_KEY = "tenant = ? AND reuse_key = ?"

#: What a statement may begin with to be planned (not BEGIN, SAVEPOINT, COMMIT...).
_PLANNED = ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")


async def _recorded_life(path: Path) -> _Recording:
    """The statements of :func:`_a_task_life` on a SQLite store at ``path``: the database
    thread's and the long reads' (``read_aside``, made on its first read) in one record."""
    async with opened(sqlite_database(path), fair=FairConfig(buffer=1), reuse=LIFE_REUSE) as rec:
        backend = rec.store.backend
        assert isinstance(backend, SqliteBackend) and backend._conn is not None
        recording = _Recording(backend._conn)
        backend._conn = recording  # type: ignore[assignment]
        connect = backend.aside._connect

        def aside_recorded() -> Any:
            aside = _Recording(connect())
            aside.seen = recording.seen
            return aside

        backend.aside._connect = aside_recorded  # type: ignore[method-assign]
        try:
            await _a_task_life(rec)
        finally:
            backend._conn = recording._conn
        assert backend.aside.reads > 0, "the scenario ran no long read"
    return recording


async def test_sqlite_no_statement_of_a_task_life_scans_the_tasks_table(tmp_path: Path) -> None:
    """Every statement of :func:`_a_task_life` reads ``tasks`` through an index: a query that
    names a partial index's condition with bound parameters instead of its literals, or an index
    dropped from under a query, turns into a scan of every task ever kept."""
    path = tmp_path / "tasks.db"
    recording = await _recorded_life(path)
    scans, lookups = [], 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for sql, args in recording.seen.items():
            if sql.lstrip().upper().startswith(_PLANNED):
                plan = " / ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
                if any(
                    step.startswith(("SCAN tasks", "SCAN t")) and "INDEX" not in step
                    for step in plan.split(" / ")
                ):
                    scans.append((sql, plan))
                if _BY_REUSE_KEY in sql:
                    lookups += 1
                    if "INDEX tasks_reuse" not in plan:  # not the tenant's every task
                        scans.append((sql, plan))
    assert scans == []
    assert lookups >= 2, "the scenario ran no reuse lookup"
    assert len(recording.seen) > 30, "the scenario ran fewer statements than it was written for"


async def test_sqlite_a_task_rows_writes_and_reuse_lookups_build_no_ephemeral_table(tmp_path: Path) -> None:
    """No insert of a task's row, no update of one task's row and no reuse lookup of
    :func:`_a_task_life` has SQLite build a b-tree of its own to run it (``OpenEphemeral``: two
    pages allocated and zeroed and the values inserted, each time the statement runs). Migration
    17: a partial index conditioned on ``status IN`` a list of three had every insert and update
    of a task build one (an update, two: its old row and its new one), and a lookup seeking by
    ``status IN (2, 3)`` one more. (What needs one for its own sake, once per call and not per
    task, is not looked at: a ``GROUP BY``, a subquery's ids, a ``RETURNING``.)"""
    path = tmp_path / "tasks.db"
    recording = await _recorded_life(path)
    looked, built = [], []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.text_factory = bytes  # a statement's blob parameters are not text
        for sql, args in recording.seen.items():
            writes_a_row = (
                sql.startswith(("INSERT INTO tasks ", "UPDATE tasks SET ")) and "(SELECT" not in sql
            )
            if writes_a_row or _BY_REUSE_KEY in sql:
                looked.append(sql)
                if "OpenEphemeral" in [bytes(r[1]).decode() for r in conn.execute(f"EXPLAIN {sql}", args)]:
                    built.append(sql)
    assert built == [], "\n".join(built)
    assert len(looked) >= 8, "the scenario ran fewer of these statements than it was written for"


async def test_postgres_no_statement_of_a_task_life_scans_the_tasks_table(
    postgres: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`_a_task_life`'s statements on PostgreSQL, each planned as a prepared statement's
    generic plan (what asyncpg's cached statements come to run, where a parameter cannot prove a
    partial index's condition) with sequential scans priced out: none reads ``tasks`` in full."""
    seen: dict[str, int] = {}

    def recording(name: str) -> Any:
        real = getattr(PgTx, name)

        async def run(self: PgTx, sql: str, *args: Any) -> Any:
            if name == "executemany":
                rows = list(args[0])
                seen.setdefault(sql, len(rows[0]) if rows else 0)
                return await real(self, sql, rows)
            seen.setdefault(
                f"{sql} RETURNING {args[0]}" if name == "insert" else sql, len(args) - (name == "insert")
            )
            return await real(self, sql, *args)

        return run

    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval", "insert"):
        monkeypatch.setattr(PgTx, name, recording(name))
    async with opened(
        Database("postgres", postgres.url, postgres.count_rows), fair=FairConfig(buffer=1), reuse=LIFE_REUSE
    ) as rec:
        await _a_task_life(rec)
    monkeypatch.undo()
    scans = []
    conn = await asyncpg.connect(postgres.url)
    try:
        for i, (sql, n) in enumerate(seen.items()):
            if not sql.lstrip().upper().startswith(_PLANNED):
                continue
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.execute(f"PREPARE s{i} AS {numbered(sql)}")
                nulls = f"({', '.join(['NULL'] * n)})" if n else ""
                plan = "\n".join(str(r[0]) for r in await conn.fetch(f"EXPLAIN EXECUTE s{i}{nulls}"))
                await conn.execute(f"DEALLOCATE s{i}")
            if "Seq Scan on tasks" in plan or (_BY_REUSE_KEY in sql and "tasks_reuse" not in plan):
                scans.append((sql, plan))
    finally:
        await conn.close()
    assert scans == []
    assert len(seen) > 25, "the scenario ran fewer statements than it was written for"


async def test_sqlite_a_create_writes_its_task_row_once(tmp_path: Path) -> None:
    """On SQLite a create inserts its event first and its row with the event's sequence and
    snapshot, so nothing writes the row again before the commit (a trigger counts the row's
    updates): the same task, events and sequences as before, one write less. A batch's events go
    out in sequence order."""
    path = tmp_path / "tasks.db"
    async with opened(sqlite_database(path)) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            row_writes = row_updates(conn)
            made = await rec.store.create_many("t1", [tts_request("char_once"), image_request()])
            assert row_writes() == []
            for task, created in made:
                assert created
                row = conn.execute("SELECT last_seq, task FROM tasks WHERE id = ?", (task.id,)).fetchone()
                [event] = await rec.events(task.id)
                assert event.type == EV.TASK_EVENT_TYPE_QUEUED and row[0] == event.sequence > 0
                stored = task_pb2.Task.FromString(row[1])
                read = await rec.store.get("t1", task.id)
                read.ClearField("queue_position")  # filled at read
                assert stored == event.task == read
        sequences = [e.event.sequence for e in rec.envelopes]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


async def test_sqlite_a_progress_report_leaves_the_indexed_state_columns_unwritten(tmp_path: Path) -> None:
    """A progress report (an event that keeps the task's status and retry time) writes its row
    without ``status``, ``next_attempt_time`` and ``update_time``, so SQLite rewrites none of the
    indexes over them (``tasks_running``, ``tasks_dispatched``, ``tasks_reuse``...). A trigger on
    those columns counts the row writes that name them. The row's ``update_time`` is when the
    task's state last changed (the claim's event while it runs, the completion's once it ended),
    not the task's own ``update_time`` (its last change of any kind)."""
    path = tmp_path / "tasks.db"
    async with opened(sqlite_database(path)) as rec:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            state_writes = row_updates(conn, "status, next_attempt_time, update_time")

            def writes() -> int:
                return len(state_writes())

            def state_changed() -> int:
                row = conn.execute("SELECT update_time FROM tasks WHERE id = ?", (task.id,)).fetchone()
                return int(row[0])

            task, _ = await rec.store.create("t1", image_request())
            assert state_changed() == task.create_time.ToMicroseconds()
            rec.clock.advance(1.0)
            await rec.store.claim(task.id, 1, "w")
            assert writes() == 1  # QUEUED -> RUNNING
            claimed_at = state_changed()
            # The time of the claim's event (the task's update_time then).
            assert claimed_at == (await rec.store.get("t1", task.id)).update_time.ToMicroseconds()
            rec.clock.advance(1.0)
            await rec.store.progress(task.id, 1, 40, "generating")
            await rec.store.progress(task.id, 1, 60, "generating")
            assert writes() == 1
            running = await rec.store.get("t1", task.id)
            assert (running.status, running.progress, running.stage) == (RUNNING, 60, "generating")
            assert state_changed() == claimed_at  # the task's update_time moved; its state did not
            assert running.update_time.ToMicroseconds() > claimed_at + 1_000_000
            outcome, _, failed = await rec.store.fail(fail_req(task.id, 1, ErrorKind.PROVIDER_TIMEOUT))
            assert (outcome, failed.status) == (spb.FAIL_OUTCOME_RETRY, QUEUED)
            assert writes() == 2  # RUNNING -> QUEUED with a retry time
            claim = await claim_when_due(rec, task.id)
            await rec.store.progress(task.id, claim.attempt, 50, "generating")
            rec.clock.advance(1.0)
            done = await rec.store.complete(complete_req(task.id, claim.attempt))
            assert (done.status, done.progress) == (COMPLETED, 100)
            assert writes() == 4  # the second claim and the completion; not the report between
            # Now the completion event's time.
            assert state_changed() == done.update_time.ToMicroseconds() > claimed_at + 1_000_000
        again = await rec.store.get("t1", task.id)
        assert again == done


async def test_postgres_the_lane_index_gives_way_to_an_index_of_running_tasks(postgres: PgDatabase) -> None:
    """A database of schema 12 (``tasks_lane`` over every task) gets ``tasks_running`` (running
    tasks only) at 13 and loses ``tasks_lane``; the fair share's running counts read the new
    index, and a claim and a completion move a task into it and out."""
    db = Database("postgres", postgres.url, postgres.count_rows)
    async with opened(db):
        pass
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute("DROP INDEX tasks_running")
        await conn.execute("CREATE INDEX tasks_lane ON tasks (type, status, priority, create_time)")
        await conn.execute("DELETE FROM schema_version WHERE version >= 13")
        async with opened(db) as rec:
            task, _ = await rec.store.create("t1", image_request())
            assert (await rec.store.claim(task.id, 1, "w")).outcome == RUN
            names = {
                r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'")
            }
            assert "tasks_running" in names and "tasks_lane" not in names
            running = "SELECT id FROM tasks WHERE type = $1 AND status = 2 AND tenant = $2"
            assert [r[0] for r in await conn.fetch(running, int(IMAGE), "t1")] == [task.id]
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {running}", int(IMAGE), "t1"))
            assert "tasks_running" in plan
            await rec.store.complete(complete_req(task.id, 1))
            assert await conn.fetch(running, int(IMAGE), "t1") == []
        assert await conn.fetchval("SELECT MAX(version) FROM schema_version") == LATEST_VERSION
    finally:
        await conn.close()


async def test_postgres_a_progress_report_is_a_hot_update(postgres: PgDatabase) -> None:
    """On PostgreSQL a progress report changes no indexed column of ``tasks`` (the row's
    ``update_time``, when its state last changed, stays), so it is a heap-only (HOT) update: no
    new entry in any of the table's indexes (the GIN over metadata included). Were that column
    moved by every report (it was: ``tasks_ended`` and ``tasks_reuse`` carry it), not one report
    would be HOT. The counters are read once the store's connections have exited (a backend's
    statistics reach the shared counters as it exits), and waited for a while in case they come
    later than its entry leaves ``pg_stat_activity``."""
    async with opened(Database("postgres", postgres.url, postgres.count_rows)) as rec:
        task, _ = await rec.store.create("t1", tts_request("char_hot"))
        rec.clock.advance(1.0)
        await rec.store.claim(task.id, 1, "w")
        claimed_at = (await rec.store.get("t1", task.id)).update_time.ToMicroseconds()  # its claim event
        for progress in range(20, 40):
            rec.clock.advance(0.1)
            await rec.store.progress(task.id, 1, progress, "generating")
        running = await rec.store.get("t1", task.id)
        assert (running.status, running.progress) == (RUNNING, 39)
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    await eventually(lambda: _is_zero(postgres.fetchval(others)), timeout=30)
    assert await postgres.fetchval("SELECT update_time FROM tasks WHERE id = $1", task.id) == claimed_at
    hot = "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'"
    with contextlib.suppress(AssertionError):  # asserted below, with the count
        await eventually(lambda: _at_least(postgres.fetchval(hot), 20), timeout=10)
    counted = await postgres.fetchval(hot)
    assert counted >= 20, f"{counted} HOT updates of tasks for 20 progress reports"


async def test_postgres_a_publication_record_is_a_hot_update(postgres: PgDatabase) -> None:
    """On PostgreSQL the relay's record of a publication writes the task's stream sequence alone,
    no indexed column (the dispatch time was set as the job entered the outbox), so it is a
    heap-only (HOT) update; until migration 15 it set ``dispatched_at`` too, and every record
    added an entry to each of the table's indexes. Counted as in the test above: the store that
    records the publications opens after the creates' store has exited, and its updates of
    ``tasks`` are set against its HOT updates once it has exited in turn."""
    db = Database("postgres", postgres.url, postgres.count_rows)
    async with opened(db) as rec:
        made = [(await rec.store.create("t1", image_request()))[0] for _ in range(5)]
    stat = "SELECT {} FROM pg_stat_user_tables WHERE relname = 'tasks'"
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    async def settled(column: str, wanted: int) -> int:
        """``column`` once every other connection has gone and it reached ``wanted`` (or 10 s)."""
        await eventually(lambda: _is_zero(postgres.fetchval(others)), timeout=30)
        with contextlib.suppress(AssertionError):  # a backend's counters may come late
            await eventually(lambda: _at_least(postgres.fetchval(stat.format(column)), wanted), timeout=10)
        return int(await postgres.fetchval(stat.format(column)))

    assert await settled("n_tup_ins", 5) >= 5
    updates = int(await postgres.fetchval(stat.format("n_tup_upd")))
    hot = int(await postgres.fetchval(stat.format("n_tup_hot_upd")))
    async with opened(db) as rec:
        rows = await rec.store.pending_dispatches()
        assert sorted(r.task_id for r in rows) == sorted(t.id for t in made)
        await rec.store.mark_dispatched([(row, 100 + i) for i, row in enumerate(rows)])
    hot = await settled("n_tup_hot_upd", hot + 5) - hot
    updates = await settled("n_tup_upd", updates + 5) - updates
    assert (updates, hot) == (5, 5), f"{hot} of {updates} updates of tasks HOT for 5 publication records"
    recorded = "SELECT string_agg(stream_seq::text, ',' ORDER BY stream_seq) FROM tasks"
    recorded += " WHERE dispatched_at > 0"
    assert await postgres.fetchval(recorded) == "100,101,102,103,104"


async def _is_zero(value: Any) -> bool:
    return int(await value) == 0


async def _at_least(value: Any, wanted: int) -> bool:
    return int(await value) >= wanted


# -- migrations and restart ------------------------------------------------------------------
async def test_restart_keeps_tasks_sequences_and_the_schema_version(db: Database) -> None:
    async with opened(db) as rec:
        clock = rec.clock
        first, _ = await rec.store.create("t1", image_request(request_id="r1"))
        second, _ = await rec.store.create("t1", image_request())
        await rec.store.claim(first.id, 1, "w")
        await rec.store.progress(first.id, 1, 40, "generating")
        before, head = await rec.store.list_events(spb.ListEventsRequest(tenant="t1"))
        assert head == 4
    async with opened(db, clock) as rec:
        after, head_after = await rec.store.list_events(spb.ListEventsRequest(tenant="t1"))
        assert (after, head_after) == (before, head)
        running = await rec.store.get("t1", first.id)
        assert (running.status, running.progress, running.attempt) == (RUNNING, 40, 1)
        again, created = await rec.store.create("t1", image_request(request_id="r1"))
        assert (again.id, created) == (first.id, False)
        done = await rec.store.complete(complete_req(first.id, 1))
        assert done.status == COMPLETED
        more, _ = await rec.store.list_events(spb.ListEventsRequest(tenant="t1", after_sequence=head))
        assert [(e.sequence, e.type) for e in more] == [(5, EV.TASK_EVENT_TYPE_COMPLETED)]
        assert (await rec.store.get("t1", second.id)).queue_position == 1
    assert await db.count_rows("schema_version") == LATEST_VERSION


# -- PostgreSQL only -------------------------------------------------------------------------
async def test_concurrent_migrators_apply_each_version_once(postgres: PgDatabase) -> None:
    stores = [open_store(postgres.url, StoreConfig()) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    versions = await postgres.fetchval("SELECT array_agg(version ORDER BY version) FROM schema_version")
    assert list(versions) == list(range(1, LATEST_VERSION + 1))


async def test_metadata_filter_is_served_by_the_gin_index(postgres: PgDatabase) -> None:
    async with opened(Database("postgres", postgres.url, postgres.count_rows)):
        pass  # migrated
    conn = await asyncpg.connect(postgres.url)
    try:
        # 20 000 tasks of 3 tenants and 500 characters: a selective filter (one character) is
        # what the GIN index is for; the planner picks it over the tenant's date index.
        # what the GIN index is for; the planner picks it over the tenant's date index.
        await conn.execute(
            "INSERT INTO tasks (id, tenant, type, priority, status, max_attempts, create_time,"
            " update_time, metadata, task)"
            " SELECT 'task_' || g, 't' || (g % 3), 1, 2, 1, 6, g, g,"
            " jsonb_build_object('characterId', 'char_' || (g % 500), 'category', 'k' || (g % 4)),"
            " '\\x00'::bytea FROM generate_series(1, 20000) g"
        )
        await conn.execute("ANALYZE tasks")
        for document in ('{"characterId":"char_2"}', '{"category":"k2","characterId":"char_2"}'):
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    # The statement list_tasks runs for a metadata filter.
                    "EXPLAIN SELECT task FROM tasks WHERE tenant = $1 AND metadata @> $2::jsonb"
                    " ORDER BY create_time DESC, id DESC LIMIT 51",
                    "t2",
                    document,
                )
            )
            assert "Bitmap Index Scan on tasks_metadata" in plan, plan
        column = await conn.fetchval(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'tasks' AND column_name = 'metadata'"
        )
        assert column == "jsonb"
        index = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'tasks_metadata'")
        assert "USING gin (metadata jsonb_path_ops)" in index
        request_index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'tasks_request'"
        )
        assert "UNIQUE" in request_index
        assert "WHERE (request_id IS NOT NULL)" in request_index
    finally:
        await conn.close()


async def test_database_url_and_password_file_are_read_without_leaking(
    postgres: PgDatabase, tmp_path: Path
) -> None:
    from charai.task_store.postgres_backend import redact_url
    from charai.task_store.settings import Settings

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = Settings(database_url=postgres.url, database_password_file=str(secret))
    assert settings.is_postgres()
    assert settings.database_password() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert redact_url("postgresql://u:s3cret@db:5432/charai") == "postgresql://u@db:5432/charai"
    missing = Settings(database_url=postgres.url, database_password_file=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="CHARAI_DATABASE_PASSWORD_FILE"):
        missing.database_password()
    with pytest.raises(ValueError, match="CHARAI_DATABASE_URL") as err:
        Settings(database_url="mysql://u:s3cret@h/db").resolved_database_url()
    assert "s3cret" not in str(err.value)
    # trust authentication ignores the password; the store opens and names itself without one.
    store = open_store(postgres.url.replace("postgres@", "postgres:s3cret@"), StoreConfig())
    async with store:
        assert "s3cret" not in store.describe()
        assert store.describe().startswith("postgresql: postgresql://postgres@127.0.0.1:")


# -- delete and retention --------------------------------------------------------------------
async def test_delete_removes_an_ended_task_with_its_events_and_refuses_the_rest(
    db: Database, rec: Recorded
) -> None:
    store = rec.store
    done, _ = await store.create("t1", image_request("char_a", metadata={"category": "gallery"}))
    await store.claim(done.id, 1, "w")
    await store.complete(complete_req(done.id, 1))
    queued, _ = await store.create("t1", image_request("char_a"))
    running, _ = await store.create("t1", image_request("char_a"))
    await store.claim(running.id, 1, "w")
    for task in (queued, running):
        with pytest.raises(TaskNotFinishedError):
            await store.deletable("t1", task.id)
        with pytest.raises(TaskNotFinishedError):
            await store.delete("t1", task.id)
    with pytest.raises(NotFoundError):
        await store.deletable("t2", done.id)  # another tenant's task does not exist for t2
    assert not await store.delete("t2", done.id)
    before = [await db.count_rows(t) for t in ("tasks", "events")]
    assert (await store.deletable("t1", done.id)).image_result.image_url == "charai-media:x.png"
    assert await store.delete("t1", done.id)
    assert not await store.delete("t1", done.id)  # gone already
    with pytest.raises(NotFoundError):
        await store.get("t1", done.id)
    assert await rec.events(done.id) == []
    assert [await db.count_rows(t) for t in ("tasks", "events")] == [before[0] - 1, before[1] - 3]
    listed, _ = await store.list_tasks(
        "t1", task_service_pb2.ListTasksRequest(metadata={"characterId": "char_a"})
    )
    assert {t.id for t in listed} == {queued.id, running.id}
    filtered, _ = await store.list_tasks(
        "t1", task_service_pb2.ListTasksRequest(metadata={"category": "gallery"})
    )
    assert filtered == []  # its metadata rows went with it
    # The others are still whole, and positions count the queue without it.
    assert (await store.get("t1", queued.id)).queue_position == 1
    cancelled, _ = await store.cancel("t1", queued.id)
    assert await store.delete("t1", cancelled.id)


async def test_ended_tasks_are_listed_for_retention_by_their_last_change(rec: Recorded) -> None:
    store, clock = rec.store, rec.clock
    old, _ = await store.create("t1", image_request())
    await store.cancel("t1", old.id)
    clock.advance(3600)
    kept, _ = await store.create("t2", image_request())
    await store.cancel("t2", kept.id)
    waiting, _ = await store.create("t1", image_request())
    cutoff = clock.now_us() - 1800 * 1_000_000
    assert [(tenant, task.id) for tenant, task in await store.ended_before(cutoff)] == [("t1", old.id)]
    clock.advance(3600)
    later = clock.now_us() - 1800 * 1_000_000
    assert [task.id for _, task in await store.ended_before(later)] == [old.id, kept.id]  # not the queued one
    assert [task.id for _, task in await store.ended_before(later, limit=1)] == [old.id]
    assert waiting.status == QUEUED


async def test_create_many_is_one_transaction_answered_in_order(rec: Recorded) -> None:
    store = rec.store
    earlier, _ = await store.create("t1", tts_request(request_id="again"))
    requests = [image_request(), tts_request(request_id="again"), tts_request(request_id="fresh")]
    requests.append(tts_request(request_id="fresh"))  # the same key twice in one batch
    made = await store.create_many("t1", requests)
    assert [created for _, created in made] == [True, False, True, False]
    tasks = [task for task, _ in made]
    assert tasks[1].id == earlier.id and tasks[3].id == tasks[2].id
    assert [t.type for t in tasks] == [IMAGE, TTS, TTS, TTS]
    # Each new task has its QUEUED event and its job, like a single create.
    for task in (tasks[0], tasks[2]):
        assert [e.type for e in await rec.events(task.id)] == [EV.TASK_EVENT_TYPE_QUEUED]
    pending = {row.task_id for row in await store.pending_dispatches()}
    assert {tasks[0].id, tasks[2].id} <= pending
