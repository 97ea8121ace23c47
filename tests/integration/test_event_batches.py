"""Events in batches: task_store publishes one bus message per commit batch, the gateway fans a
batch out once, and a watch stream that fell behind sends several events per message to a client
that opted in (``max_events_per_message``), while a client that did not sees no change.

An in-process stack: real nats-server, TaskStoreApp and GatewayApp on port 0, no workers (tasks
stay queued until the test cancels them). A stream is made to fall behind deterministically: a
batch create commits many events at once (one bus message, offered to the stream in one go while
it waits), or the stream resumes from a sequence the log has since moved far past.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import nats
import pytest
import pytest_asyncio
from charai.core import natsconn
from charai.core.topology import Topology
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.dispatch import BATCH_MAX_ENVELOPES, EventPublisher
from charai.task_store.settings import Settings as StoreSettings
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from nats.aio.msg import Msg

from tests.conftest import NatsServer, eventually

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

DEADLINE = 20.0
QUEUED = task_pb2.TASK_EVENT_TYPE_QUEUED
CANCELLED = task_pb2.TASK_EVENT_TYPE_CANCELLED
HEARTBEAT = task_pb2.TASK_EVENT_TYPE_HEARTBEAT
Response = task_service_pb2.WatchTaskResponse | task_service_pb2.WatchTasksResponse


@dataclasses.dataclass
class Env:
    nats_url: str
    stub: TaskServiceAsyncStub
    http: aiohttp.ClientSession
    base: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("batches")
    server = NatsServer(tmp / "nats")
    server.start()
    try:
        store_settings = StoreSettings(
            nats_url=server.url,
            data_dir=tmp,
            database_url=f"sqlite:///{tmp / 'tasks.db'}",
            shutdown_grace_seconds=1.0,
        )
        async with TaskStoreApp(store_settings, listen_addr="127.0.0.1:0") as store:
            settings = GatewaySettings(
                nats_url=server.url,
                data_dir=tmp,
                task_store_addr=f"127.0.0.1:{store.port}",
                gateway_grpc_addr="127.0.0.1:0",
                gateway_http_addr="127.0.0.1:0",
                # Long: an idle stream's catch-up never interleaves with what a test checks.
                watch_heartbeat_seconds=60.0,
                media_signing_key="test-signing-key",
                submit_rate_per_tenant=0,
                shutdown_grace_seconds=1.0,
            )
            async with (
                GatewayApp(settings) as gateway,
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
                aiohttp.ClientSession() as http,
            ):
                stub = task_service_pb2_grpc.TaskServiceStub(channel)
                yield Env(server.url, stub, http, f"http://127.0.0.1:{gateway.http_port}")
    finally:
        server.stop()


def image_request(character: str, n: int = 0) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        image=task_pb2.ImagePayload(
            character_id=character, prompt=f"view {n}", resolution="1024x1024", view_type="front"
        ),
    )


async def batch_create(env: Env, character: str, count: int) -> list[task_pb2.Task]:
    requests = [image_request(character, n) for n in range(count)]
    response = await env.stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(requests=requests), timeout=DEADLINE
    )
    return list(response.tasks)


async def cancel_all(env: Env, tasks: list[task_pb2.Task]) -> None:
    for task in tasks:
        await env.stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id), timeout=DEADLINE)


def events_of(response: Response) -> list[task_pb2.TaskEvent]:
    return list(response.events) or [response.event]


async def read(call: Any) -> Response:
    async with asyncio.timeout(DEADLINE):
        response = await call.read()
    assert response is not grpc.aio.EOF, "the stream ended"
    assert isinstance(response, Response)
    return response


async def read_events(call: Any, count: int) -> list[Response]:
    """Messages until they carried ``count`` events other than heartbeats."""
    messages: list[Response] = []
    while sum(e.type != HEARTBEAT for m in messages for e in events_of(m)) < count:
        messages.append(await read(call))
    return messages


class BusRecorder:
    """Every message on the event subjects (``<ns>.events.>``), in arrival order."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def record(self, msg: Msg) -> None:
        self.messages.append(msg)

    def batches(self) -> list[list[spb.EventEnvelope]]:
        return [list(spb.EventBatch.FromString(m.data).envelopes) for m in self.messages]


# -- the bus ----------------------------------------------------------------------------------


async def test_a_batch_create_is_one_bus_message_in_commit_order(env: Env) -> None:
    topology = Topology()
    bus = BusRecorder()
    nc = await nats.connect(env.nats_url)
    try:
        await nc.subscribe(topology.events_wildcard, cb=bus.record)
        await natsconn.roundtrip(nc)  # the SUB is in before the first event
        tasks = await batch_create(env, f"char_{uuid.uuid4().hex[:8]}", 50)
        ids = [t.id for t in tasks]

        def carried() -> list[list[spb.EventEnvelope]]:
            return [[e for e in batch if e.event.task.id in ids] for batch in bus.batches()]

        await eventually(lambda: sum(map(len, carried())) >= len(ids), timeout=DEADLINE)
    finally:
        await nc.close()
    # Only the batch subject: no per-task message besides it.
    assert {m.subject for m in bus.messages} == {topology.events_subject}
    ours = [batch for batch in carried() if batch]
    assert len(ours) == 1, f"the 50 creates came in {len(ours)} bus messages"
    assert [e.event.task.id for e in ours[0]] == ids  # the order of the commit
    assert all(e.event.type == QUEUED and e.tenant == "default" for e in ours[0])
    sequences = [e.event.sequence for e in ours[0]]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def envelope(n: int, *, event_type: int = QUEUED, character: str = "c") -> spb.EventEnvelope:
    task = task_pb2.Task(id=f"task_{n:032x}", metadata={"characterId": character})
    event = task_pb2.TaskEvent(sequence=n, type=event_type, task=task)  # type: ignore[arg-type]
    return spb.EventEnvelope(tenant="t", prev_sequence=0, event=event)


async def test_the_publisher_splits_past_the_limits_in_order_and_notices_cancels(nats_url: str) -> None:
    topology = Topology(namespace=f"t{uuid.uuid4().hex[:8]}")
    bus = BusRecorder()
    nc = await nats.connect(nats_url)
    try:
        # One subscription for both subjects: the arrival order shows what was published first.
        await nc.subscribe(f"{topology.namespace}.>", cb=bus.record)
        await natsconn.roundtrip(nc)  # the SUB is in before the first event
        publisher = EventPublisher(nc, topology)
        publisher.start()
        count = 2 * BATCH_MAX_ENVELOPES + 88
        sent = [envelope(n, event_type=CANCELLED if n == 300 else QUEUED) for n in range(1, count + 1)]

        def commit_twice() -> None:  # as the database thread hands over two commits
            publisher.submit_threadsafe(sent[:100])
            publisher.submit_threadsafe(sent[100:])

        # Joined on the event loop's thread: the publisher cannot wake between the two commits.
        handed = threading.Thread(target=commit_twice)
        handed.start()
        handed.join()
        await eventually(lambda: len(bus.messages) >= 4, timeout=DEADLINE)
        await publisher.close()
    finally:
        await nc.close()
    subjects = [m.subject for m in bus.messages]
    events, cancel = topology.events_subject, topology.cancel_subject(sent[299].event.task.id)
    # Everything handed over before the publisher woke went out together, split at the limit; the
    # cancel notice follows the batch that carries the CANCELLED event.
    assert subjects == [events, events, cancel, events]
    batches = [list(spb.EventBatch.FromString(m.data).envelopes) for m in bus.messages if m.subject == events]
    assert [len(b) for b in batches] == [BATCH_MAX_ENVELOPES, BATCH_MAX_ENVELOPES, 88]
    assert [e.event.sequence for b in batches for e in b] == list(range(1, count + 1))
    assert spb.CancelNotice.FromString(bus.messages[2].data).task_id == sent[299].event.task.id
    assert publisher.messages == 3


# -- the watch streams ------------------------------------------------------------------------


async def test_an_opted_in_stream_gets_a_burst_in_one_message_and_an_old_one_event_by_event(env: Env) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    old = env.stub.WatchTasks(task_service_pb2.WatchTasksRequest(metadata={"characterId": character}))
    new = env.stub.WatchTasks(
        task_service_pb2.WatchTasksRequest(metadata={"characterId": character}, max_events_per_message=100)
    )
    try:
        for call in (old, new):  # the opening heartbeat: the watch is in place
            assert (await read(call)).event.type == HEARTBEAT
        # Neither stream is read while the events are produced: 30 creates in one commit, then
        # 30 cancels, each its own commit.
        tasks = await batch_create(env, character, 30)
        await cancel_all(env, tasks)
        old_messages = await read_events(old, 60)
        new_messages = await read_events(new, 60)
    finally:
        old.cancel()
        new.cancel()
    # The old client: one event per message, in `event`, never `events`.
    assert all(m.HasField("event") and not m.events for m in old_messages)
    # The opted-in client: the burst of creates in one message, in `events`, `event` unset.
    burst = new_messages[0]
    assert not burst.HasField("event")
    assert [(e.type, e.task.id) for e in burst.events] == [(QUEUED, t.id) for t in tasks]
    # Both saw the very same events in the very same order: nothing lost, nothing repeated.
    old_seen = [(e.sequence, e.type, e.task.id) for m in old_messages for e in events_of(m)]
    new_seen = [(e.sequence, e.type, e.task.id) for m in new_messages for e in events_of(m)]
    assert new_seen == old_seen
    assert [s for s, *_ in new_seen] == sorted(s for s, *_ in new_seen)
    assert [t for _, kind, t in new_seen if kind == CANCELLED] == [t.id for t in tasks]


async def test_a_resumed_stream_that_fell_behind_gets_the_log_in_few_messages(env: Env) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    first = await batch_create(env, character, 1)
    floor = await last_sequence(env, first[0].id)
    tasks = first + [
        (await env.stub.CreateTask(image_request(character, n), timeout=DEADLINE)).task for n in range(1, 12)
    ]
    # 11 creates, each its own commit, all after the floor: the stream resumes 11 events behind.
    request = task_service_pb2.WatchTasksRequest(
        metadata={"characterId": character}, after_sequence=floor, max_events_per_message=4
    )
    call = env.stub.WatchTasks(request)
    try:
        messages = [await read(call) for _ in range(3)]
        heartbeat = await read(call)
    finally:
        call.cancel()
    assert [len(m.events) for m in messages] == [4, 4, 3]  # at most 4 per message, as asked
    assert [e.task.id for m in messages for e in m.events] == [t.id for t in tasks[1:]]
    assert heartbeat.event.type == HEARTBEAT and not heartbeat.events  # heartbeats come alone
    await cancel_all(env, tasks)


async def last_sequence(env: Env, task_id: str) -> int:
    call = env.stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task_id))
    try:
        return (await read(call)).event.sequence  # the snapshot carries the task's last sequence
    finally:
        call.cancel()


async def test_watch_task_resuming_an_ended_task_sends_what_it_missed_in_one_message(env: Env) -> None:
    # Two tasks: the second's QUEUED is past the log's first event, so ``queued - 1`` resumes
    # after a real sequence (0 would ask for a snapshot instead; alone in its module, this test
    # created the store's first event and failed on that).
    [_, task] = await batch_create(env, f"char_{uuid.uuid4().hex[:8]}", 2)
    queued = await last_sequence(env, task.id)
    await cancel_all(env, [task])
    resume = task_service_pb2.WatchTaskRequest(id=task.id, after_sequence=queued - 1)
    old = [m async for m in env.stub.WatchTask(resume, timeout=DEADLINE)]
    resume.max_events_per_message = 8
    new = [m async for m in env.stub.WatchTask(resume, timeout=DEADLINE)]
    assert [(m.event.type, len(m.events)) for m in old] == [(QUEUED, 0), (CANCELLED, 0)]
    assert len(new) == 1 and not new[0].HasField("event")
    assert [e.type for e in new[0].events] == [QUEUED, CANCELLED]
    assert [e.sequence for e in new[0].events] == [e.event.sequence for e in old]


async def test_a_negative_max_events_per_message_is_invalid(env: Env) -> None:
    call = env.stub.WatchTasks(
        task_service_pb2.WatchTasksRequest(metadata={"characterId": "x"}, max_events_per_message=-1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_events_per_message" in (refused.value.details() or "")


# -- Server-Sent Events -----------------------------------------------------------------------


async def http_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response's HTTP chunks (one per server write), whole."""
    pending = b""
    async for data, end_of_chunk in resp.content.iter_chunks():
        pending += data
        if end_of_chunk:
            yield pending
            pending = b""


async def test_an_sse_stream_that_fell_behind_writes_its_backlog_at_once(env: Env) -> None:
    character = f"char_{uuid.uuid4().hex[:8]}"
    first = await batch_create(env, character, 1)
    floor = await last_sequence(env, first[0].id)
    tasks = [
        (await env.stub.CreateTask(image_request(character, n), timeout=DEADLINE)).task for n in range(6)
    ]
    url = f"{env.base}/api/tasks/events?metadata.characterId={character}&after={floor}"
    async with env.http.get(url) as resp, asyncio.timeout(DEADLINE):
        assert resp.status == 200
        chunks = http_chunks(resp)
        backlog = await anext(chunks)
        resume_point = await anext(chunks)
    blocks = backlog.decode().split("\n\n")
    assert blocks[0] == "retry: 1000"
    # The six missed events in one write, in order, each its own SSE event.
    assert [b.split("\n")[0] for b in blocks[1:-1]] == ["event: task:progress"] * 6
    assert [tid for b in blocks[1:-1] for tid in [t.id for t in tasks] if f'"taskId":"{tid}"' in b] == [
        t.id for t in tasks
    ]
    assert resume_point.startswith(b"event: heartbeat\n")
    await cancel_all(env, first + tasks)
