"""The promises every fault test checks once the dust has settled (DESIGN.md section 6).

``check_invariants`` waits until every task the test got an OK for has ended, then reads the
truth from each place that holds a piece of it and compares:

1. every accepted task reaches exactly one terminal state (GetTask through the gateway, within
   a deadline: a task still waiting is *stuck* and named);
2. its event log (task_store's ListEvents, the source every watcher resumes from) has strictly
   increasing sequences, starts QUEUED, each attempt started once and in order, holds exactly
   one terminal event, last, and its progress never goes back (whatever crashed meanwhile);
3. the gateway tells the same story: a fresh WatchTask snapshot sits on the last event, and a
   WatchTasks replay over the test's metadata yields every logged event once, in order;
4. a completed task has exactly one media object in the bucket (the key is made from the task
   id), whose size is the result's; no object belongs to a task the test does not know; and,
   unless the test allows it, no object was ever written twice (the bucket's stream holds
   exactly the messages of the objects that exist: a rewrite or a cut-off write leaves more);
5. the provider saw at most one generation call per attempt (``calls_per_attempt`` for a test
   whose provider answers 429s that the worker calls again inside the attempt), and at most
   ``max_attempts``;
6. no job is left in JetStream: every ``charai-<kind>-<lane>`` consumer has nothing pending
   and nothing awaiting an ack, and the work-queue stream is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import nats
from charai.client import CharaiClient
from charai.core.storeclient import StoreClient
from charai.core.topology import LANES, Topology
from charai.devstack.stack import Stack
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES, error_code_name, status_label
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from nats.js.errors import NotFoundError

from tests.e2e.helpers import call_key, describe, emulator_stats

TENANT = "default"  # auth is off on the test stacks: every caller is this tenant
TOPOLOGY = Topology()


def status_name(value: int) -> str:
    return status_label(value).upper()


def seconds_of(timestamp: Any) -> float:
    """A protobuf Timestamp as Unix seconds."""
    return float(timestamp.ToMicroseconds()) / 1e6


def task_text(task: task_pb2.Task) -> str:
    """What the provider receives (the emulator counts calls by its SHA-256)."""
    return task.tts.text if task.HasField("tts") else task.image.prompt


def media_key_of(task: task_pb2.Task) -> str:
    url = task.tts_result.audio_url if task.HasField("tts_result") else task.image_result.image_url
    return url.split("/media/", 1)[-1].split("?", 1)[0]


@dataclasses.dataclass
class TaskFacts:
    """Everything known about one task after the fault."""

    task: task_pb2.Task
    log: list[task_pb2.TaskEvent]
    calls: int
    objects: list[Any]

    @property
    def started_attempts(self) -> list[int]:
        return [e.task.attempt for e in self.log if e.type == task_pb2.TASK_EVENT_TYPE_STARTED]

    @property
    def retries(self) -> list[task_pb2.TaskEvent]:
        return [e for e in self.log if e.type == task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED]

    def first(self, event_type: int, attempt: int | None = None) -> task_pb2.TaskEvent | None:
        for event in self.log:
            if event.type == event_type and (attempt is None or event.task.attempt == attempt):
                return event
        return None

    def describe(self) -> str:
        t = self.task
        error = f" {error_code_name(t.error.code)}: {t.error.message!r}" if t.error.code else ""
        return (
            f"{t.id} {status_name(t.status)} attempt {t.attempt}{error}, {self.calls} provider calls,"
            f" {len(self.objects)} objects; log: {describe(self.log)}"
        )


@dataclasses.dataclass
class Report:
    tasks: dict[str, TaskFacts]
    #: Messages in the media bucket's stream beyond those of the objects that exist: > 0 when an
    #: object was written again (a retried attempt after a crash) or a write was cut off.
    media_extra_messages: int

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for facts in self.tasks.values():
            counts[status_name(facts.task.status)] = counts.get(status_name(facts.task.status), 0) + 1
        return f"{len(self.tasks)} tasks {counts}, {self.media_extra_messages} extra media messages"


async def wait_terminal(
    client: CharaiClient, task_ids: Iterable[str], deadline: float = 60.0
) -> dict[str, task_pb2.Task]:
    """Polls GetTask until every task has ended; names the stuck ones if the deadline passes."""
    ids = list(dict.fromkeys(task_ids))
    final: dict[str, task_pb2.Task] = {}
    latest: dict[str, task_pb2.Task] = {}
    limit = asyncio.Semaphore(32)
    end = time.monotonic() + deadline

    async def get(task_id: str) -> None:
        async with limit:
            with contextlib.suppress(Exception):  # the gateway may still be coming back
                task = await client.get(task_id)
                latest[task_id] = task
                if task.status in TERMINAL_STATUSES:
                    final[task_id] = task

    while True:
        await asyncio.gather(*(get(i) for i in ids if i not in final))
        if len(final) == len(ids):
            return final
        if time.monotonic() > end:
            stuck = [
                f"{i}: {status_name(latest[i].status)}/{latest[i].stage} attempt {latest[i].attempt}"
                if i in latest
                else f"{i}: unreadable"
                for i in ids
                if i not in final
            ]
            raise AssertionError(
                f"{len(stuck)} of {len(ids)} tasks did not end within {deadline:.0f} s: "
                + "; ".join(stuck[:20])
            )
        await asyncio.sleep(0.25)


async def store_log(store: StoreClient, task_id: str) -> list[task_pb2.TaskEvent]:
    """The task's whole event log, straight from task_store (the source of every replay)."""
    events: list[task_pb2.TaskEvent] = []
    after = 0
    while True:
        request = spb.ListEventsRequest(tenant=TENANT, task_id=task_id, after_sequence=after, limit=500)
        response = await store.list_events(request, timeout=20.0)
        events.extend(response.events)
        if len(response.events) < 500:
            return events
        after = response.events[-1].sequence


def log_problems(facts: TaskFacts) -> list[str]:
    """Invariant 2 (and the final state agreeing with the log) for one task."""
    log, task, where = facts.log, facts.task, facts.task.id
    problems: list[str] = []
    if not log:
        return [f"{where}: empty event log"]
    sequences = [e.sequence for e in log]
    if not all(b > a for a, b in itertools.pairwise(sequences)):
        problems.append(f"{where}: sequences do not strictly increase: {describe(log)}")
    if log[0].type != task_pb2.TASK_EVENT_TYPE_QUEUED:
        problems.append(f"{where}: the log does not start QUEUED: {describe(log)}")
    progress = [e.task.progress for e in log]
    if not all(b >= a for a, b in itertools.pairwise(progress)):
        # Through retries, lost workers, restarts and crashes of every process: never back.
        problems.append(f"{where}: progress went back: {progress}")
    terminal = [e for e in log if e.type in TERMINAL_EVENTS]
    if len(terminal) != 1 or log[-1].type not in TERMINAL_EVENTS:
        problems.append(f"{where}: {len(terminal)} terminal events, last is not terminal: {describe(log)}")
    elif log[-1].task.status != task.status:
        problems.append(
            f"{where}: GetTask says {status_name(task.status)}, the log ends {describe(log[-1:])}"
        )
    started = facts.started_attempts
    if started != list(range(1, len(started) + 1)):
        problems.append(f"{where}: attempts started {started}, expected 1..n each once")
    if started and task.attempt != started[-1]:
        problems.append(f"{where}: task.attempt {task.attempt} but the last STARTED is attempt {started[-1]}")
    if task.status == task_pb2.TASK_STATUS_COMPLETED:
        if task.progress != 100 or task.WhichOneof("result") is None:
            problems.append(f"{where}: completed without progress 100 and a result")
    elif task.status == task_pb2.TASK_STATUS_FAILED and not task.error.code:
        problems.append(f"{where}: failed without an error code")
    return problems


def watcher_problems(
    task_id: str, events: Sequence[task_pb2.TaskEvent], log: Sequence[task_pb2.TaskEvent]
) -> list[str]:
    """What one ``CharaiClient.watch(task_id)`` from sequence 0 saw, against the task's log: a
    snapshot, then every logged event after it exactly once, in order, the terminal one last,
    however many times the stream was dropped and resumed meanwhile."""
    where = f"{task_id} watcher: {describe(events)}"
    if not events or events[0].type != task_pb2.TASK_EVENT_TYPE_SNAPSHOT:
        return [f"{where}: no snapshot first"]
    rest = list(events[1:])
    if not rest or rest[-1].type not in TERMINAL_EVENTS:
        return [f"{where}: does not end with the terminal event"]
    expected = [(e.sequence, e.type) for e in log if e.sequence > events[0].sequence]
    if [(e.sequence, e.type) for e in rest] != expected:
        return [f"{where}: is not the log after its snapshot: {describe(log)}"]
    return []


async def gateway_snapshot_problems(stack: Stack, facts: Sequence[TaskFacts]) -> list[str]:
    """Invariant 3a: WatchTask(after_sequence=0) of an ended task is one snapshot of its last event."""
    problems: list[str] = []
    limit = asyncio.Semaphore(20)
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)

        async def one(f: TaskFacts) -> None:
            async with limit:
                call = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=f.task.id), timeout=20)
                events = [r.event async for r in call]
                last = f.log[-1]
                if (
                    len(events) != 1
                    or events[0].type != task_pb2.TASK_EVENT_TYPE_SNAPSHOT
                    or events[0].sequence != last.sequence
                    or events[0].task.status != last.task.status
                ):
                    problems.append(
                        f"{f.task.id}: WatchTask snapshot {describe(events)} is not the last event "
                        f"{describe([last])}"
                    )

        await asyncio.gather(*(one(f) for f in facts))
    return problems


async def gateway_replay_problems(
    client: CharaiClient, metadata: Mapping[str, str], facts: Sequence[TaskFacts], timeout: float = 30.0
) -> list[str]:
    """Invariant 3b: a WatchTasks replay over ``metadata`` yields each task's logged events once,
    in order (from the first sequence a replay can ask for: ``after_sequence`` 0 means "now")."""
    after = max(1, min(f.log[0].sequence for f in facts) - 1)
    wanted = {f.task.id for f in facts}
    seen: dict[str, list[int]] = {i: [] for i in wanted}
    pending_terminal = set(wanted)

    async def read() -> None:
        async for event in client.watch_tasks(metadata, after_sequence=after):
            if event.task.id in seen:
                seen[event.task.id].append(event.sequence)
                if event.type in TERMINAL_EVENTS:
                    pending_terminal.discard(event.task.id)

    reader = asyncio.create_task(read())
    problems: list[str] = []
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while pending_terminal:
                    await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # one heartbeat more: a repeated event would show up now
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    for f in facts:
        expected = [e.sequence for e in f.log if e.sequence > after]
        if seen[f.task.id] != expected:
            problems.append(
                f"{f.task.id}: the WatchTasks replay gave sequences {seen[f.task.id]}, the log {expected}"
            )
    return problems


async def media_objects(stack: Stack) -> tuple[list[Any], int]:
    """Every object in the media bucket, and the message count of the bucket's stream."""
    nc = await nats.connect(stack.nats_url, connect_timeout=5, max_reconnect_attempts=5)
    try:
        js = nc.jetstream()
        store = await js.object_store(TOPOLOGY.media_bucket)
        try:
            objects = await store.list(ignore_deletes=True)
        except NotFoundError:
            objects = []
        status = await store.status()
        return list(objects), int(status.stream_info.state.last_seq)
    finally:
        await nc.close()


async def jetstream_backlog(stack: Stack) -> dict[str, tuple[int, int]]:
    """(num_pending, num_ack_pending) of every job consumer, plus the stream's message count
    under the key ``stream``. All zeros means every job was settled."""
    nc = await nats.connect(stack.nats_url, connect_timeout=5, max_reconnect_attempts=5)
    try:
        js = nc.jetstream()
        found: dict[str, tuple[int, int]] = {}
        for kind in ("image", "tts"):
            for lane in LANES:
                name = TOPOLOGY.consumer(kind, lane)
                try:
                    info = await js.consumer_info(TOPOLOGY.jobs_stream, name)
                except NotFoundError:
                    continue
                found[name] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
        stream = await js.stream_info(TOPOLOGY.jobs_stream)
        found["stream"] = (int(stream.state.messages), 0)
        return found
    finally:
        await nc.close()


async def wait_jetstream_idle(stack: Stack, timeout: float = 15.0) -> None:
    """Invariant 6, given the time an ack needs to follow the store's terminal state."""
    end = time.monotonic() + timeout
    while True:
        backlog = await jetstream_backlog(stack)
        if all(v == (0, 0) for v in backlog.values()):
            return
        if time.monotonic() > end:
            raise AssertionError(f"jobs left in JetStream (pending, ack pending): {backlog}")
        await asyncio.sleep(0.25)


async def check_invariants(
    stack: Stack,
    client: CharaiClient,
    task_ids: Iterable[str],
    *,
    metadata: Mapping[str, str] | None = None,
    deadline: float = 60.0,
    max_attempts: int = 6,
    media_rewrites: bool = False,
    calls_per_attempt: int = 1,
) -> Report:
    """Checks invariants 1-6 over ``task_ids`` (every task the test got an OK for) and returns
    the facts, so the test can check what its fault should have caused on top.

    Args:
        metadata: the test's own metadata filter, for the WatchTasks replay (skipped if None).
        deadline: seconds every task has to end (from now).
        max_attempts: the stack's CHARAI_MAX_ATTEMPTS.
        media_rewrites: the fault may legitimately make an attempt write its task's media again
            (a crash after the write, before the result was recorded).
        calls_per_attempt: provider calls one attempt may make: more than 1 only when the
            provider refuses calls with a short Retry-After, which the worker waits out and calls
            again inside the attempt (a refused call generated nothing).
    """
    ids = list(dict.fromkeys(task_ids))
    finals = await wait_terminal(client, ids, deadline)
    stats = await asyncio.to_thread(emulator_stats, stack)
    objects, stream_messages = await media_objects(stack)
    by_task: dict[str, list[Any]] = {}
    for info in objects:
        by_task.setdefault(info.name.split(".", 1)[0], []).append(info)

    limit = asyncio.Semaphore(32)
    async with StoreClient(stack.task_store_addr, stack.env.get("CHARAI_INTERNAL_TOKEN", "")) as store:

        async def facts_of(task_id: str) -> TaskFacts:
            async with limit:
                log = await store_log(store, task_id)
            task = finals[task_id]
            calls = int(stats["by_key"].get(call_key(task_text(task)), 0))
            return TaskFacts(task, log, calls, by_task.get(task_id, []))

        facts = {f.task.id: f for f in await asyncio.gather(*(facts_of(i) for i in ids))}

    problems: list[str] = []
    for f in facts.values():
        problems += log_problems(f)
        t = f.task
        # 4. media: one object per completed task, its size the result's.
        if t.status == task_pb2.TASK_STATUS_COMPLETED:
            size = t.tts_result.size_bytes if t.HasField("tts_result") else t.image_result.size_bytes
            names = [o.name for o in f.objects]
            if names != [media_key_of(t)] or int(f.objects[0].size) != size:
                problems.append(
                    f"{t.id}: objects {[(o.name, o.size) for o in f.objects]}, the result says "
                    f"{media_key_of(t)} of {size} bytes"
                )
        elif len(f.objects) > 1:
            problems.append(f"{t.id}: {len(f.objects)} objects for a task that did not complete")
        # 5. provider calls: at most one per attempt (or calls_per_attempt).
        if f.calls > t.attempt * calls_per_attempt or t.attempt > max_attempts:
            problems.append(f"{t.id}: {f.calls} provider calls in {t.attempt} attempts (max {max_attempts})")
        if t.status == task_pb2.TASK_STATUS_COMPLETED and f.calls < 1:
            problems.append(f"{t.id}: completed without a provider call")
    strangers = sorted(set(by_task) - set(facts))
    if strangers:
        problems.append(f"objects of tasks the test never created: {strangers[:5]}")
    expected_messages = sum(int(o.chunks) + 1 for o in objects)
    extra = stream_messages - expected_messages
    if extra and not media_rewrites:
        problems.append(
            f"the media stream holds {stream_messages} messages, the {len(objects)} objects account for "
            f"{expected_messages}: some media was written more than once"
        )
    if not problems:
        problems += await gateway_snapshot_problems(stack, list(facts.values()))
        if metadata is not None:
            problems += await gateway_replay_problems(client, metadata, list(facts.values()))
    if problems:
        raise AssertionError(f"{len(problems)} invariant violations:\n" + "\n".join(problems[:30]))
    await wait_jetstream_idle(stack)
    return Report(facts, extra)
