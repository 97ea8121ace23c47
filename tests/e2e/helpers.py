"""Helpers of the end-to-end tests: unique texts, event collection, provider call counts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import nats
import nats.js.errors
from charai.client import CharaiClient
from charai.core.topology import Topology
from charai.devstack.stack import Stack
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.conftest import eventually


def EVENT_NAME(value: int) -> str:
    return task_pb2.TaskEventType.Name(value)  # type: ignore[arg-type]


def STATUS_NAME(value: int) -> str:
    return task_pb2.TaskStatus.Name(value)  # type: ignore[arg-type]


def CODE_NAME(value: int) -> str:
    return task_pb2.ErrorCode.Name(value)  # type: ignore[arg-type]


def unique(label: str) -> str:
    """``label`` plus a random suffix, so emulator counters never mix two tests' calls."""
    return f"{label} {uuid.uuid4().hex[:12]}"


async def collect(
    client: CharaiClient, task_id: str, *, after_sequence: int = 0, timeout: float = 30.0
) -> list[task_pb2.TaskEvent]:
    """Every event ``client.watch`` yields (it stops at the terminal event)."""
    async with asyncio.timeout(timeout):
        return [event async for event in client.watch(task_id, after_sequence)]


async def history(client: CharaiClient, task_id: str, timeout: float = 30.0) -> list[task_pb2.TaskEvent]:
    """The task's whole event log through WatchTask's resume path.

    WatchTask filters by task, so resuming after sequence 1 replays every event of the task
    (only the very first event of a fresh stack has sequence 1).
    """
    return await collect(client, task_id, after_sequence=1, timeout=timeout)


def emulator_stats(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(stack.emulator_url + "/_emulator/stats", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _gate(stack: Stack, body: bytes | None) -> dict[str, Any]:
    request = urllib.request.Request(
        stack.emulator_url + "/_emulator/gate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def set_gate(stack: Stack, *, open: bool) -> None:
    """Closes the emulator's gate (generation calls wait there) or opens it (they go on)."""
    await asyncio.to_thread(_gate, stack, json.dumps({"open": open}).encode())


async def wait_held(stack: Stack, count: int, timeout: float = 60.0) -> None:
    """Waits until the closed gate holds ``count`` calls."""

    async def held() -> bool:
        return int((await asyncio.to_thread(_gate, stack, None))["held"]) >= count

    await eventually(held, timeout=timeout, interval=0.05)


def call_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def provider_calls(stack: Stack, text: str) -> int:
    """Generation calls the emulator received with exactly this prompt/input (polls excluded)."""
    stats = await asyncio.to_thread(emulator_stats, stack)
    return int(stats["by_key"].get(call_key(text), 0))


def seconds(timestamp: Any) -> float:
    return float(timestamp.ToMicroseconds()) / 1e6


def describe(events: Sequence[task_pb2.TaskEvent]) -> str:
    """A compact one-line picture of an event list, for assertion messages."""
    parts = []
    for e in events:
        name = EVENT_NAME(e.type).removeprefix("TASK_EVENT_TYPE_")
        extra = f"a{e.task.attempt} p{e.task.progress}"
        if e.task.error.code:
            extra += f" {CODE_NAME(e.task.error.code).removeprefix('ERROR_CODE_')}"
        parts.append(f"#{e.sequence} {name}({extra})")
    return ", ".join(parts)


def check_sequences(events: Sequence[task_pb2.TaskEvent], what: str) -> None:
    sequences = [e.sequence for e in events]
    assert all(b > a for a, b in itertools.pairwise(sequences)), (
        f"{what}: sequences do not strictly increase: {describe(events)}"
    )


def check_one_terminal_at_end(events: Sequence[task_pb2.TaskEvent], what: str) -> None:
    terminal = [e for e in events if e.type in TERMINAL_EVENTS]
    assert len(terminal) == 1, f"{what}: expected exactly one terminal event: {describe(events)}"
    assert events[-1].type in TERMINAL_EVENTS, (
        f"{what}: the terminal event is not the last: {describe(events)}"
    )


class RawWatch:
    """A WatchTask / WatchTasks stream on its own channel, heartbeats included (the client hides
    them). Used where a test needs to know the stream is open, or that it ended."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self.stub = task_service_pb2_grpc.TaskServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RawWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def watch_tasks(self, metadata: Mapping[str, str], after_sequence: int = 0) -> Any:
        return self.stub.WatchTasks(
            task_service_pb2.WatchTasksRequest(metadata=dict(metadata), after_sequence=after_sequence)
        )

    def watch_task(self, task_id: str, after_sequence: int = 0) -> Any:
        request = task_service_pb2.WatchTaskRequest(id=task_id, after_sequence=after_sequence)
        return self.stub.WatchTask(request)


async def drain_for(call: Any, seconds_: float) -> tuple[list[task_pb2.TaskEvent], bool]:
    """Reads a stream for up to ``seconds_``; returns its events (heartbeats included) and whether
    the server ended the stream by itself within that time."""
    events: list[task_pb2.TaskEvent] = []
    ended = False

    async def read() -> None:
        nonlocal ended
        async for response in call:
            events.append(response.event)
        ended = True

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds_):
            await read()
    call.cancel()
    return events, ended


async def jobs_left(stack: Stack, task_ids: Iterable[str]) -> set[str]:
    """The tasks among ``task_ids`` that still have a job in the jobs stream (a work queue: a job
    leaves it when a worker acknowledges it). A task without one can be run by no worker again,
    so no event of a run can be stored for it any more."""
    wanted = set(task_ids)
    left: set[str] = set()
    topology = Topology()
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(topology.jobs_stream)
        seq = info.state.first_seq
        while info.state.messages and seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(topology.jobs_stream, seq, subject=topology.jobs_subjects, next=True)
            except nats.js.errors.NotFoundError:
                break
            task_id = spb.Job.FromString(msg.data or b"").task_id
            if task_id in wanted:
                left.add(task_id)
            seq = int(msg.seq or seq) + 1
    finally:
        await nc.close()
    return left


async def no_jobs_left(stack: Stack, task_ids: Iterable[str]) -> bool:
    return not await jobs_left(stack, task_ids)


async def terminal_counts(
    client: CharaiClient,
    stack: Stack,
    metadata: Mapping[str, str],
    task_ids: Sequence[str],
    timeout: float = 30.0,
) -> dict[str, int]:
    """Terminal events per task in the event log, read through WatchTasks from the start of the log.

    Waits until every task has ended and none has a job left (nothing can run them again), then
    reads the log up to its head (a multi-task stream's first heartbeat comes once it has sent
    everything up to the head), so a second terminal event stored for a task is counted too.
    """

    async def ended() -> bool:
        tasks = await asyncio.gather(*(client.get(i) for i in task_ids))
        return all(t.status in TERMINAL_STATUSES for t in tasks)

    await eventually(ended, timeout=timeout, interval=0.1)
    await eventually(lambda: no_jobs_left(stack, task_ids), timeout=timeout, interval=0.1)
    counts = dict.fromkeys(task_ids, 0)
    async with RawWatch(stack.gateway_grpc) as raw, asyncio.timeout(timeout):
        call = raw.watch_tasks(metadata, after_sequence=1)
        async for response in call:
            event = response.event
            if event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                break  # everything up to the log's head has been sent
            if event.task.id in counts and event.type in TERMINAL_EVENTS:
                counts[event.task.id] += 1
        call.cancel()
    return counts


async def aiter_with_timeout(stream: AsyncIterator[Any], timeout: float) -> Any:
    async with asyncio.timeout(timeout):
        return await anext(stream)
