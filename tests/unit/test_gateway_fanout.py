"""The gateway's live-event fan-out (charai.gateway.events and the watch streams of
charai.gateway.service), against an in-memory task_store: no NATS, no processes.

What is checked: one event is encoded once and the very same bytes reach every stream that
receives it, with media URLs signed on a copy (the hub's envelope is shared, so it stays as sent);
tenants stay apart; the inbox hands over everything queued at once, reports idleness after its
timeout and marks overflow; the TaskService registration that lets the streams pass bytes
through keeps every unary method's (de)serializers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from charai.core.grpcsupport import ServerInterceptor
from charai.core.media import MEDIA_URL_PREFIX, UrlSigner
from charai.core.topology import Topology
from charai.gateway import events
from charai.gateway.events import EventHub, LiveEvent, Watcher
from charai.gateway.service import TaskService, add_to_server
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

TASK_ID = "task_" + "0123456789abcdef" * 2
HEAD = 7


class FakeStore:
    """task_store's answers: an empty event log at sequence HEAD, and one task."""

    def __init__(self) -> None:
        self.list_calls = 0

    async def list_events(self, request: spb.ListEventsRequest, **_: Any) -> spb.ListEventsResponse:
        self.list_calls += 1
        return spb.ListEventsResponse(head_sequence=HEAD)

    async def get_task(self, tenant: str, task_id: str, **_: Any) -> task_pb2.Task:
        return task_pb2.Task(id=task_id, status=task_pb2.TASK_STATUS_RUNNING, progress=40)


class FakeContext:
    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return None


@dataclass
class FakeMsg:
    data: bytes
    subject: str = "charai.events.x"


def service_and_hub(heartbeat: float = 30.0) -> tuple[TaskService, EventHub]:
    hub = EventHub(None, Topology())  # type: ignore[arg-type]  # _on_msg is fed directly
    service = TaskService(
        FakeStore(),  # type: ignore[arg-type]
        hub,
        UrlSigner(b"k" * 32, 3600),
        lambda: "https://gw.example",
        heartbeat_seconds=heartbeat,
    )
    return service, hub


def envelope(tenant: str, character: str, sequence: int, *, image_key: str = "") -> spb.EventEnvelope:
    task = task_pb2.Task(
        id=TASK_ID,
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        status=task_pb2.TASK_STATUS_RUNNING,
        progress=sequence,
        metadata={"characterId": character},
    )
    if image_key:
        task.image_result.image_url = MEDIA_URL_PREFIX + image_key
    event = task_pb2.TaskEvent(sequence=sequence, type=task_pb2.TASK_EVENT_TYPE_PROGRESS, task=task)
    return spb.EventEnvelope(tenant=tenant, prev_sequence=0, event=event)


async def open_watch(service: TaskService, character: str) -> AsyncGenerator[bytes, None]:
    """A WatchTasks stream past its opening heartbeat."""
    stream = service.WatchTasks(
        task_service_pb2.WatchTasksRequest(metadata={"characterId": character}),
        FakeContext(),  # type: ignore[arg-type]
    )
    assert isinstance(stream, AsyncGenerator)  # an async generator function: the tests aclose() it
    first = task_service_pb2.WatchTasksResponse.FromString(await anext(stream))
    assert first.event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT
    assert first.event.sequence == HEAD
    return stream


async def test_one_event_is_encoded_once_and_the_same_bytes_reach_every_stream() -> None:
    service, hub = service_and_hub()
    a = await open_watch(service, "c1")
    b = await open_watch(service, "c1")
    sent = envelope("default", "c1", HEAD + 1, image_key=f"{TASK_ID}.png")

    await hub._on_msg(FakeMsg(sent.SerializeToString()))  # type: ignore[arg-type]
    wire_a, wire_b = await anext(a), await anext(b)

    assert wire_a is wire_b  # one encoding, shared
    got = task_service_pb2.WatchTasksResponse.FromString(wire_a).event
    assert got.sequence == HEAD + 1 and got.task.progress == HEAD + 1
    url = got.task.image_result.image_url
    assert url.startswith(f"https://gw.example/media/{TASK_ID}.png?exp=")  # signed for clients
    await a.aclose()
    await b.aclose()
    assert hub.open_streams == 0


async def test_the_shared_envelope_is_not_modified_by_presenting_it() -> None:
    env = envelope("default", "c1", 3, image_key=f"{TASK_ID}.png")
    live = LiveEvent(env)
    service, _ = service_and_hub()
    live.wire(service._wire)
    assert env.event.task.image_result.image_url == MEDIA_URL_PREFIX + f"{TASK_ID}.png"


async def test_encode_runs_once_per_event_however_many_streams_send_it() -> None:
    calls: list[int] = []

    def encode(event: task_pb2.TaskEvent) -> bytes:
        calls.append(event.sequence)
        return event.SerializeToString()

    live = LiveEvent(envelope("default", "c1", 5))
    assert {id(live.wire(encode)) for _ in range(10)} == {id(live.wire(encode))}
    assert calls == [5]


async def test_a_stream_never_receives_another_tenants_event() -> None:
    service, hub = service_and_hub()
    mine = await open_watch(service, "c1")  # tenant "default" (no authentication)
    await hub._on_msg(FakeMsg(envelope("other", "c1", HEAD + 1).SerializeToString()))  # type: ignore[arg-type]
    await hub._on_msg(FakeMsg(envelope("default", "c1", HEAD + 2).SerializeToString()))  # type: ignore[arg-type]
    got = task_service_pb2.WatchTasksResponse.FromString(await anext(mine)).event
    assert got.sequence == HEAD + 2
    await mine.aclose()


async def test_take_hands_over_everything_queued_in_order() -> None:
    watcher = Watcher(tenant="t")
    items = [LiveEvent(envelope("t", "c", n)) for n in range(3)]
    for item in items:
        watcher.offer(item)
    assert await watcher.take(5.0) == items
    assert not watcher.inbox


async def test_take_wakes_on_an_offer_and_returns_nothing_after_the_timeout() -> None:
    watcher = Watcher(tenant="t")
    assert await watcher.take(0.01) == []  # idle: the stream catches up and sends a heartbeat
    item = LiveEvent(envelope("t", "c", 1))
    waiting = asyncio.ensure_future(watcher.take(5.0))
    await asyncio.sleep(0)
    watcher.offer(item)
    assert await asyncio.wait_for(waiting, 1.0) == [item]


async def test_an_overflowing_inbox_is_marked_lagged_but_shutdown_still_gets_in() -> None:
    watcher = Watcher(tenant="t")
    item = LiveEvent(envelope("t", "c", 1))
    for _ in range(events.QUEUE_LIMIT + 5):
        watcher.offer(item)
    assert watcher.lagged and len(watcher.inbox) == events.QUEUE_LIMIT
    watcher.end()
    assert watcher.inbox[-1] is None
    watcher.clear()
    assert not watcher.lagged and not watcher.inbox


@pytest.fixture
async def served() -> AsyncIterator[tuple[TaskServiceAsyncStub, EventHub]]:
    service, hub = service_and_hub()
    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield task_service_pb2_grpc.TaskServiceStub(channel), hub
    finally:
        await channel.close()
        await server.stop(None)


async def test_registration_keeps_unary_methods_and_streams_pass_bytes_through(
    served: tuple[TaskServiceAsyncStub, EventHub],
) -> None:
    stub, hub = served
    # A unary method: the generated serializer still encodes the servicer's message.
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=TASK_ID), timeout=5)
    assert got.task.id == TASK_ID and got.task.progress == 40
    # A stream: the servicer's bytes arrive as the typed response a normal client decodes.
    call = stub.WatchTasks(task_service_pb2.WatchTasksRequest(metadata={"characterId": "c9"}), timeout=5)
    first = await call.read()
    assert isinstance(first, task_service_pb2.WatchTasksResponse)  # not grpc.aio.EOF
    assert first.event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT
    await hub._on_msg(FakeMsg(envelope("default", "c9", HEAD + 1).SerializeToString()))  # type: ignore[arg-type]
    second = await call.read()
    assert isinstance(second, task_service_pb2.WatchTasksResponse)
    assert second.event.sequence == HEAD + 1 and second.event.task.metadata["characterId"] == "c9"
    call.cancel()
    # Single-task stream: snapshot first, then live events.
    single = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=TASK_ID), timeout=5)
    snapshot = await single.read()
    assert isinstance(snapshot, task_service_pb2.WatchTaskResponse)
    assert snapshot.event.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT and snapshot.event.task.id == TASK_ID
    single.cancel()
