"""Load for the fault tests: many tasks at once, submitted the way a careful client does (retrying
with the same ``request_id`` until it gets an answer), and small probes of the running stack."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.e2e.helpers import call_key, emulator_stats

#: Answers a client retries (with the same request_id): the gateway or task_store is down or
#: restarting, or its deadline passed meanwhile. Anything else (INTERNAL included) is a real
#: refusal or a bug, and fails the test.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def run_id() -> str:
    """A characterId of its own per test: ListTasks / WatchTasks over it see only this test."""
    return f"char_{uuid.uuid4().hex[:16]}"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One task to submit: ``kind`` is ``tts`` or ``image``; ``text`` is the TTS text or prompt."""

    kind: str
    text: str
    request_id: str = ""
    priority: int = task_pb2.PRIORITY_NORMAL


def specs(kind: str, count: int, label: str, marker: str = "", *, request_ids: bool = True) -> list[Spec]:
    """``count`` tasks with unique texts (so the emulator counts each one's calls apart)."""
    tag = uuid.uuid4().hex[:8]
    return [
        Spec(
            kind,
            f"{label} {tag} number {i} {marker}".strip(),
            request_id=f"{label}-{tag}-{i}" if request_ids else "",
        )
        for i in range(count)
    ]


@dataclasses.dataclass
class Submitted:
    """What submitting one Spec came to: the task the OK carried, and the errors retried."""

    spec: Spec
    task: task_pb2.Task | None = None
    retried: list[str] = dataclasses.field(default_factory=list)
    ok_at: float = 0.0


def create_request(character: str, spec: Spec) -> task_service_pb2.CreateTaskRequest:
    request = task_service_pb2.CreateTaskRequest(request_id=spec.request_id, priority=spec.priority)  # type: ignore[arg-type]
    if spec.kind == "tts":
        request.type = task_pb2.TASK_TYPE_TTS_GENERATION
        request.tts.CopyFrom(
            task_pb2.TtsPayload(character_id=character, text=spec.text, voice_style="tongtong")
        )
    else:
        request.type = task_pb2.TASK_TYPE_IMAGE_GENERATION
        request.image.CopyFrom(
            task_pb2.ImagePayload(
                character_id=character, prompt=spec.text, resolution="1024x1024", view_type="front"
            )
        )
    return request


class Submitter:
    """Impatient clients: each CreateTask has a short deadline (``timeout``), and a call that
    fails transiently is sent again, with the same request_id, until it gets an answer. Spread
    over ``channels`` connections, like many independent clients."""

    def __init__(self, target: str, *, channels: int = 4, timeout: float = 5.0) -> None:
        self._channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self._stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in self._channels]
        self._next = 0
        self.timeout = timeout

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> Submitter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        character: str,
        spec: Spec,
        *,
        deadline: float = 60.0,
        on_ok: Callable[[Submitted], None] | None = None,
    ) -> Submitted:
        """Creates one task, retrying transient failures with the same request_id until OK."""
        stub = self._stubs[self._next % len(self._stubs)]
        self._next += 1
        request = create_request(character, spec)
        result = Submitted(spec)
        end = time.monotonic() + deadline
        while True:
            try:
                response = await stub.CreateTask(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > end:
                    raise
                result.retried.append(exc.code().name)
                await asyncio.sleep(0.05)
                continue
            result.task = response.task
            result.ok_at = time.monotonic()
            if on_ok is not None:
                on_ok(result)
            return result

    async def submit_all(
        self,
        character: str,
        items: Sequence[Spec],
        *,
        deadline: float = 60.0,
        on_ok: Callable[[Submitted], None] | None = None,
    ) -> list[Submitted]:
        return list(
            await asyncio.gather(*(self.submit(character, s, deadline=deadline, on_ok=on_ok) for s in items))
        )


async def submit(client: CharaiClient, character: str, spec: Spec) -> task_pb2.Task:
    """One task through CharaiClient (no fault expected while it is created)."""
    if spec.kind == "tts":
        return await client.create_tts(
            character, spec.text, request_id=spec.request_id, priority=spec.priority
        )
    return await client.create_image(
        character, spec.text, resolution="1024x1024", request_id=spec.request_id, priority=spec.priority
    )


async def submit_all(client: CharaiClient, character: str, items: Sequence[Spec]) -> list[task_pb2.Task]:
    return list(await asyncio.gather(*(submit(client, character, s) for s in items)))


def ids(items: Iterable[Submitted | task_pb2.Task]) -> list[str]:
    found = []
    for item in items:
        task = item.task if isinstance(item, Submitted) else item
        if task is not None:
            found.append(task.id)
    return found


async def wait_until(
    client: CharaiClient,
    task_ids: Iterable[str],
    predicate: Callable[[task_pb2.Task], bool],
    timeout: float,
    what: str,
) -> dict[str, task_pb2.Task]:
    """Polls GetTask until ``predicate`` holds for every task."""
    wanted = list(task_ids)
    end = time.monotonic() + timeout
    seen: dict[str, task_pb2.Task] = {}
    while True:
        tasks = await asyncio.gather(*(client.get(i) for i in wanted))
        seen = {t.id: t for t in tasks}
        if all(predicate(t) for t in tasks):
            return seen
        if time.monotonic() > end:
            late = [f"{t.id} {t.status} attempt {t.attempt}" for t in tasks if not predicate(t)]
            raise AssertionError(f"not all tasks {what} within {timeout} s: {late[:10]}")
        await asyncio.sleep(0.1)


async def wait_calls(stack: Stack, texts: Iterable[str], minimum: int, timeout: float) -> None:
    """Waits until the provider has received at least ``minimum`` calls for each text."""
    keys = [call_key(t) for t in texts]
    end = time.monotonic() + timeout
    while True:
        stats = await asyncio.to_thread(emulator_stats, stack)
        if all(stats["by_key"].get(k, 0) >= minimum for k in keys):
            return
        if time.monotonic() > end:
            raise AssertionError(
                f"the provider did not see {minimum} call(s) for every text within {timeout} s"
            )
        await asyncio.sleep(0.05)


class StatsRecorder:
    """Samples the emulator's counters as fast as it answers: a time series of provider calls
    and answers, to see *when* calls arrived (the counters alone say only how many).

    Each sample is ``(asked, answered, stats)``: the counters were read at some instant between
    the two monotonic times, which is all a test may rely on.
    """

    def __init__(self, stack: Stack, interval: float = 0.02) -> None:
        self._stack = stack
        self._interval = interval
        self.samples: list[tuple[float, float, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            asked = time.monotonic()
            stats = await asyncio.to_thread(emulator_stats, self._stack)
            self.samples.append((asked, time.monotonic(), stats))
            await asyncio.sleep(self._interval)

    async def __aenter__(self) -> StatsRecorder:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
