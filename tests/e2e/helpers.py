"""Helpers of the end-to-end tests: unique texts, event collection, provider call counts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.taskapi import TERMINAL_EVENTS
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc


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


async def terminal_counts(
    client: CharaiClient, metadata: Mapping[str, str], task_ids: Sequence[str], timeout: float = 20.0
) -> dict[str, int]:
    """Terminal events per task in the event log, read through WatchTasks from the start of the log.

    Reads until every task's terminal event arrived, then one heartbeat interval more, so a second
    terminal event stored for the same task would show up too.
    """
    counts = dict.fromkeys(task_ids, 0)
    wanted = set(task_ids)

    async def read() -> None:
        async for event in client.watch_tasks(metadata, after_sequence=1):
            if event.task.id in counts and event.type in TERMINAL_EVENTS:
                counts[event.task.id] += 1
                wanted.discard(event.task.id)

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(timeout):
            while wanted:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return counts


async def aiter_with_timeout(stream: AsyncIterator[Any], timeout: float) -> Any:
    async with asyncio.timeout(timeout):
        return await anext(stream)
