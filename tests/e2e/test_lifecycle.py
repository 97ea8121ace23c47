"""Task lifecycle through the public API: cancelling (queued and running), resuming watches,
watching a character's tasks, listing and paging, idempotent creation, validation, and queue
positions. Tests that stop a worker start it again before they end."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc
import pytest
from charai.client import CharaiClient, CharaiError
from charai.devstack.stack import Stack
from charai.taskapi import TERMINAL_EVENTS
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.conftest import eventually

from .helpers import (
    RawWatch,
    check_one_terminal_at_end,
    check_sequences,
    collect,
    describe,
    drain_for,
    emulator_stats,
    history,
    no_jobs_left,
    provider_calls,
    unique,
)

C = task_pb2
HEARTBEAT = C.TASK_EVENT_TYPE_HEARTBEAT


def char(label: str) -> str:
    """A character id of its own for one test (ids allow letters, digits, '_', '-', '.', ':')."""
    return f"char_{label}_{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def stopped(stack: Stack, name: str) -> AsyncIterator[None]:
    """The worker ``name`` is stopped inside the block and running again after it."""
    await stack.stop_service(name)
    try:
        yield
    finally:
        await stack.start_service(name)
        await stack.wait_for_line(name, "worker_started", 20)


async def all_tasks(client: CharaiClient, metadata: dict[str, str], **kw: int) -> list[task_pb2.Task]:
    return [t async for t in client.list(metadata, **kw)]


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_queued_task_never_reaches_the_provider(client: CharaiClient, stack: Stack) -> None:
    character = char("cancel_q")
    text = unique("cancel me while queued")
    async with stopped(stack, "tts_worker"):
        task = await client.create_tts(character, text)
        assert task.status == C.TASK_STATUS_QUEUED
        got = await client.get(task.id)
        assert got.status == C.TASK_STATUS_QUEUED and got.queue_position >= 1, got
        cancelled = await client.cancel(task.id)
        assert cancelled.status == C.TASK_STATUS_CANCELLED, cancelled
        assert cancelled.HasField("end_time")
        live = await collect(client, task.id, timeout=10)
        assert [e.type for e in live] == [C.TASK_EVENT_TYPE_SNAPSHOT], describe(live)
        assert live[0].task.status == C.TASK_STATUS_CANCELLED
        # Cancelling again changes nothing.
        again = await client.cancel(task.id)
        assert again.status == C.TASK_STATUS_CANCELLED
    # The worker is back: it must skip the cancelled job. A later task of the same lane completing
    # shows the worker has consumed the queue past it; the cancelled task's job leaving the jobs
    # stream (acknowledged, or never sent) shows no worker can run it any more.
    after = await client.create_tts(character, unique("after the restart"))
    done = await collect(client, after.id, timeout=30)
    assert done[-1].task.status == C.TASK_STATUS_COMPLETED, describe(done)
    await eventually(lambda: no_jobs_left(stack, [task.id]), timeout=20)
    log = await history(client, task.id, timeout=10)
    assert C.TASK_EVENT_TYPE_STARTED not in [e.type for e in log], describe(log)
    assert [e.type for e in log][-1:] == [C.TASK_EVENT_TYPE_CANCELLED], describe(log)
    check_one_terminal_at_end(log, "cancelled queued task")
    final = await client.get(task.id)
    assert final.status == C.TASK_STATUS_CANCELLED and final.attempt == 0, final
    assert await provider_calls(stack, text) == 0, "the provider was called for a task cancelled while queued"


async def test_cancel_running_task_aborts_the_provider_call(client: CharaiClient, stack: Stack) -> None:
    text = unique("cancel me while drawing") + " [[hang:30]]"
    task = await client.create_image(char("cancel_r"), text, resolution="1024x1024")
    events: list[task_pb2.TaskEvent] = []

    async def follow() -> None:
        async for event in client.watch(task.id):
            events.append(event)

    cut_before = emulator_stats(stack)["cancelled"]
    watcher = asyncio.create_task(follow())
    try:
        # The provider call is under way (the emulator holds it for 30 s).
        await eventually(lambda: any(e.task.progress >= 20 for e in events), timeout=20)
        cancelled = await client.cancel(task.id)
        assert cancelled.status == C.TASK_STATUS_CANCELLED, cancelled
        async with asyncio.timeout(5):
            await watcher
    finally:
        watcher.cancel()
    assert events[-1].type == C.TASK_EVENT_TYPE_CANCELLED, describe(events)
    assert all(e.type != C.TASK_EVENT_TYPE_COMPLETED for e in events), describe(events)
    check_sequences(events, "running cancel")
    line = await stack.wait_for_line(
        "image_worker",
        "job_finished",
        10,
        where=lambda line: line.get("task_id") == task.id and line.get("outcome") == "aborted",
    )
    # The worker did not wait the call out: "aborted" is the outcome of the cancel notice only (a
    # provider timeout would be a failure), and the emulator saw the held call cut off by its
    # client rather than answered.
    assert line["outcome"] == "aborted", line
    await eventually(lambda: emulator_stats(stack)["cancelled"] > cut_before, timeout=20)
    assert await provider_calls(stack, text) == 1
    log = await history(client, task.id, timeout=10)
    check_one_terminal_at_end(log, "cancelled running task")
    assert log[-1].type == C.TASK_EVENT_TYPE_CANCELLED
    assert (await client.get(task.id)).status == C.TASK_STATUS_CANCELLED


# -- watching ----------------------------------------------------------------------------------


async def test_watch_task_resumes_after_any_sequence(client: CharaiClient, stack: Stack) -> None:
    task = await client.create_image(
        char("resume"), unique("resume me") + " [[latency:0.6]]", resolution="1024x1024"
    )
    live = await collect(client, task.id)
    assert live[-1].type == C.TASK_EVENT_TYPE_COMPLETED, describe(live)
    full = await history(client, task.id)
    check_sequences(full, "full log")
    check_one_terminal_at_end(full, "full log")
    assert len(full) >= 5, describe(full)  # queued, started, progress..., completed
    # The live stream is a suffix of the log: nothing after the snapshot was skipped.
    tail = [(e.sequence, e.type) for e in live[1:]]
    assert [(e.sequence, e.type) for e in full[len(full) - len(tail) :]] == tail

    def picture(events: list[task_pb2.TaskEvent]) -> list[tuple[int, int, int, int]]:
        return [(e.sequence, e.type, e.task.progress, e.task.status) for e in events]

    for index in (0, len(full) // 2, len(full) - 2):
        resumed = await collect(client, task.id, after_sequence=full[index].sequence, timeout=10)
        assert picture(resumed) == picture(full[index + 1 :]), (
            f"resumed after #{full[index].sequence}: {describe(resumed)}; log: {describe(full)}"
        )

    # Resuming after the terminal event: nothing is left to send, and the task is over, so the
    # stream must not repeat anything and should end by itself.
    async with RawWatch(stack.gateway_grpc) as raw:
        call = raw.watch_task(task.id, after_sequence=full[-1].sequence)
        events, ended = await drain_for(call, 30)  # a hang guard: the stream must end by itself
    real = [e for e in events if e.type != HEARTBEAT]
    assert not real, f"events repeated after the terminal one: {describe(real)}"
    assert ended, (
        "WatchTask(after_sequence=<the terminal event's sequence>) on a finished task never ends: "
        f"it sent {len(events)} heartbeats in 30 s and stayed open (DESIGN: WatchTask ends after the "
        "terminal event; a reconnecting client, e.g. an SSE EventSource with Last-Event-ID, waits forever)"
    )


async def test_watch_tasks_streams_every_event_of_matching_tasks(client: CharaiClient, stack: Stack) -> None:
    x, y = char("wx"), char("wy")
    async with RawWatch(stack.gateway_grpc) as raw:
        call = raw.watch_tasks({"characterId": x})
        # A heartbeat proves the stream is open; its sequence is where it starts.
        async with asyncio.timeout(10):
            first = (await anext(aiter(call))).event
        seen: list[task_pb2.TaskEvent] = [] if first.type == HEARTBEAT else [first]
        start = first.sequence if first.type == HEARTBEAT else first.sequence - 1
        image = await client.create_image(x, unique("x image"), resolution="1024x1024")
        tts = await client.create_tts(x, unique("x voice"))
        other = await client.create_tts(y, unique("y voice"))
        ids = {image.id, tts.id}
        ended: set[str] = set()
        try:
            async with asyncio.timeout(30):
                async for response in call:
                    event = response.event
                    if event.type == HEARTBEAT:
                        continue
                    seen.append(event)
                    if event.type in TERMINAL_EVENTS:
                        ended.add(event.task.id)
                    if ended >= ids:
                        break
        finally:
            call.cancel()
    assert {e.task.id for e in seen} <= ids, f"events of other tasks: {describe(seen)}"
    check_sequences(seen, "WatchTasks")
    other_done = await collect(client, other.id)
    assert other_done[-1].task.status == C.TASK_STATUS_COMPLETED
    for task_id in ids:
        mine = [e for e in seen if e.task.id == task_id]
        log = await history(client, task_id)
        assert [(e.sequence, e.type) for e in mine] == [(e.sequence, e.type) for e in log], (
            f"WatchTasks saw {describe(mine)}, the task's log is {describe(log)}"
        )
        assert mine[0].type == C.TASK_EVENT_TYPE_QUEUED and mine[-1].type == C.TASK_EVENT_TYPE_COMPLETED

    # The client's resumable stream from the same cursor replays the same events.
    replayed: list[task_pb2.TaskEvent] = []
    async with (
        asyncio.timeout(15),
        contextlib.aclosing(
            cast(
                AsyncGenerator[task_pb2.TaskEvent, None],
                client.watch_tasks({"characterId": x}, after_sequence=start),
            )
        ) as stream,
    ):
        async for event in stream:
            replayed.append(event)
            if len(replayed) == len(seen):
                break
    assert [(e.sequence, e.type) for e in replayed] == [(e.sequence, e.type) for e in seen]


# -- listing -----------------------------------------------------------------------------------


async def test_list_tasks_filters_orders_and_pages(client: CharaiClient, stack: Stack) -> None:
    x = char("list")
    created = [
        await client.create_image(
            x, unique("costume 1"), resolution="1024x1024", metadata={"category": "costume"}
        ),
        await client.create_tts(x, unique("voice 1"), metadata={"category": "voice"}),
        await client.create_image(
            x, unique("costume 2"), resolution="1024x1024", metadata={"category": "costume"}
        ),
        # A content refusal fails this task alone (an auth refusal would open the credential's
        # breaker and fail the other tests' images too: README, "Providers are shared").
        await client.create_image(x, unique("refused") + " [[content]]", resolution="1024x1024"),
    ]
    finals = {t.id: (await collect(client, t.id))[-1].task.status for t in created}
    assert list(finals.values()) == [C.TASK_STATUS_COMPLETED] * 3 + [C.TASK_STATUS_FAILED], finals
    newest_first = [t.id for t in reversed(created)]

    everything = await all_tasks(client, {"characterId": x})
    assert [t.id for t in everything] == newest_first
    assert all(t.metadata["characterId"] == x for t in everything)
    create_times = [t.create_time.ToMicroseconds() for t in everything]
    assert create_times == sorted(create_times, reverse=True)

    costumes = await all_tasks(client, {"characterId": x, "category": "costume"})
    assert [t.id for t in costumes] == [created[2].id, created[0].id]
    assert await all_tasks(client, {"characterId": x, "category": "nothing"}) == []
    assert await all_tasks(client, {"characterId": char("nobody")}) == []

    paged = await all_tasks(client, {"characterId": x}, page_size=1)
    assert [t.id for t in paged] == newest_first
    async with RawWatch(stack.gateway_grpc) as raw:
        page = await raw.stub.ListTasks(
            task_service_pb2.ListTasksRequest(metadata={"characterId": x}, page_size=1), timeout=10
        )
        assert len(page.tasks) == 1 and page.next_page_token
        page = await raw.stub.ListTasks(
            task_service_pb2.ListTasksRequest(metadata={"characterId": x}, page_size=3), timeout=10
        )
        assert len(page.tasks) == 3 and page.next_page_token
        last = await raw.stub.ListTasks(
            task_service_pb2.ListTasksRequest(
                metadata={"characterId": x}, page_size=3, page_token=page.next_page_token
            ),
            timeout=10,
        )
        assert [t.id for t in last.tasks] == [created[0].id] and not last.next_page_token

    images = await all_tasks(client, {"characterId": x}, task_type=C.TASK_TYPE_IMAGE_GENERATION)
    assert [t.id for t in images] == [created[3].id, created[2].id, created[0].id]
    voices = await all_tasks(client, {"characterId": x}, task_type=C.TASK_TYPE_TTS_GENERATION)
    assert [t.id for t in voices] == [created[1].id]
    failed = await all_tasks(client, {"characterId": x}, status=C.TASK_STATUS_FAILED)
    assert [t.id for t in failed] == [created[3].id]
    done = await all_tasks(client, {"characterId": x}, status=C.TASK_STATUS_COMPLETED)
    assert [t.id for t in done] == [created[2].id, created[1].id, created[0].id]
    both = await all_tasks(
        client, {"characterId": x}, task_type=C.TASK_TYPE_IMAGE_GENERATION, status=C.TASK_STATUS_COMPLETED
    )
    assert [t.id for t in both] == [created[2].id, created[0].id]
    assert await all_tasks(client, {"characterId": x}, status=C.TASK_STATUS_QUEUED) == []


# -- idempotency -------------------------------------------------------------------------------


async def test_create_with_the_same_request_id_returns_the_same_task(client: CharaiClient) -> None:
    x = char("idem")
    request_id = str(uuid.uuid4())
    first = await client.create_tts(x, unique("once"), request_id=request_id)
    second = await client.create_tts(x, unique("once"), request_id=request_id)
    assert second.id == first.id
    assert first.request_id == request_id
    assert [t.id for t in await all_tasks(client, {"characterId": x})] == [first.id]

    y = char("idem_many")
    request_id = str(uuid.uuid4())
    text = unique("ten at once")
    tasks = await asyncio.gather(*(client.create_tts(y, text, request_id=request_id) for _ in range(10)))
    assert len({t.id for t in tasks}) == 1, [t.id for t in tasks]
    listed = await all_tasks(client, {"characterId": y})
    assert [t.id for t in listed] == [tasks[0].id]
    final = (await collect(client, tasks[0].id))[-1].task
    assert final.status == C.TASK_STATUS_COMPLETED


# -- validation --------------------------------------------------------------------------------


def _image(character: str, **kw: object) -> task_pb2.ImagePayload:
    fields: dict[str, object] = {"character_id": character, "prompt": "a knight", "view_type": "front"}
    fields.update(kw)
    return task_pb2.ImagePayload(**fields)  # type: ignore[arg-type]


def _tts(character: str, **kw: object) -> task_pb2.TtsPayload:
    fields: dict[str, object] = {"character_id": character, "text": "hello", "voice_style": "tongtong"}
    fields.update(kw)
    return task_pb2.TtsPayload(**fields)  # type: ignore[arg-type]


IMAGE, TTS = C.TASK_TYPE_IMAGE_GENERATION, C.TASK_TYPE_TTS_GENERATION
BAD_REQUESTS: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "empty-prompt": ("image.prompt", lambda c: dict(type=IMAGE, image=_image(c, prompt=""))),
    "blank-prompt": ("image.prompt", lambda c: dict(type=IMAGE, image=_image(c, prompt="   "))),
    "long-text": ("tts.text", lambda c: dict(type=TTS, tts=_tts(c, text="a" * 1025))),
    "resolution-12x12": ("image.resolution", lambda c: dict(type=IMAGE, image=_image(c, resolution="12x12"))),
    "resolution-abc": ("image.resolution", lambda c: dict(type=IMAGE, image=_image(c, resolution="abc"))),
    "speed-3": ("tts.speed", lambda c: dict(type=TTS, tts=_tts(c, speed=3.0))),
    "volume-0": ("tts.volume", lambda c: dict(type=TTS, tts=_tts(c, volume=0.0))),
    "type-payload-mismatch": ("payload", lambda c: dict(type=TTS, image=_image(c))),
    "no-payload": ("payload", lambda c: dict(type=IMAGE)),
    "priority-7": ("priority", lambda c: dict(type=TTS, priority=7, tts=_tts(c))),
    "metadata-40": (
        "metadata",
        lambda c: dict(type=TTS, tts=_tts(c), metadata={f"k{i}": "v" for i in range(40)}),
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_bad_request_is_invalid_argument_naming_the_field(client: CharaiClient, name: str) -> None:
    field, build = BAD_REQUESTS[name]
    character = char("bad")
    request = task_service_pb2.CreateTaskRequest(**build(character))
    with pytest.raises(CharaiError) as caught:
        await client.create(request)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in [f for f, _ in error.fields], f"{name}: fields {error.fields} do not name {field!r}"
    assert all(description for _, description in error.fields)
    assert await all_tasks(client, {"characterId": character}) == [], f"{name}: a rejected request was stored"


async def test_unknown_task_ids(client: CharaiClient, stack: Stack) -> None:
    unknown = "task_" + uuid.uuid4().hex
    codes: dict[str, str] = {}
    for name, call in (("GetTask", client.get), ("CancelTask", client.cancel)):
        try:
            await call(unknown)
            codes[name] = "OK"
        except CharaiError as exc:
            codes[name] = f"{exc.code.name} {exc.message[:120]!r}"
    async with RawWatch(stack.gateway_grpc) as raw:
        try:
            async with asyncio.timeout(10):
                async for _ in raw.watch_task(unknown):
                    pass
            codes["WatchTask"] = "OK"
        except grpc.aio.AioRpcError as exc:
            codes["WatchTask"] = f"{exc.code().name} {(exc.details() or '')[:120]!r}"
    wrong = {name: got for name, got in codes.items() if not got.startswith("NOT_FOUND")}
    assert not wrong, (
        f"an unknown task id must be NOT_FOUND (DESIGN section 3), got {wrong}: the gateway passes the "
        "task_store's AioRpcError through its interceptor, which turns it into UNKNOWN"
    )
    with pytest.raises(CharaiError) as caught:
        await client.get("not-a-task-id")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.fields] == ["id"]


# -- queue position ----------------------------------------------------------------------------


async def test_queue_position_orders_high_before_normal(client: CharaiClient, stack: Stack) -> None:
    x = char("queue")
    async with stopped(stack, "image_worker"):
        normal_1 = await client.create_image(x, unique("normal 1"), resolution="1024x1024")
        normal_2 = await client.create_image(x, unique("normal 2"), resolution="1024x1024")
        high = await client.create_image(x, unique("high"), resolution="1024x1024", priority=C.PRIORITY_HIGH)
        positions = {
            name: (await client.get(t.id)).queue_position
            for name, t in (("high", high), ("normal 1", normal_1), ("normal 2", normal_2))
        }
        assert positions == {"high": 1, "normal 1": 2, "normal 2": 3}, positions
        async with contextlib.aclosing(
            cast(AsyncGenerator[task_pb2.TaskEvent, None], client.watch(high.id))
        ) as stream:
            snapshot = (await anext(stream)).task
        assert snapshot.queue_position == 1, snapshot
        assert all(t.status == C.TASK_STATUS_QUEUED for t in await all_tasks(client, {"characterId": x}))
    finals = await asyncio.gather(*(collect(client, t.id) for t in (normal_1, normal_2, high)))
    for events in finals:
        assert events[-1].task.status == C.TASK_STATUS_COMPLETED, describe(events)
        assert events[-1].task.queue_position == 0
