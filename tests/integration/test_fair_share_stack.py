"""Fair share through the real stack: task_store (SQLite) + nats-server + a TTS worker + the
provider emulator admitting 2 calls at once, each call slow (latency).

Tenant A queues a long backlog of slow tasks; once the lane runs steadily, tenant B queues 5.
B's first task must start at the next claim and reach the provider at the next free slot, not
behind A's backlog nor behind the jobs already released or claimed ahead of the provider: judged
by the order of events in the log (sequence numbers are commit order) and of the calls in the
emulator's call log, never by time. And A's tasks all still complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from charai.core.storeclient import StoreClient
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.tts_worker.app import build
from charai.worker import jobs
from charai.worker.app import WorkerApp
from charai.worker.settings import TtsWorkerSettings

from tests.conftest import eventually
from tests.security.harness import crash_worker

if TYPE_CHECKING:
    from tests.conftest import NatsServer

EV = task_pb2.TaskEventType
SLOTS = 2  # calls the emulator admits at once (429 beyond)
BUFFER = 2  # CHARAI_DISPATCH_BUFFER
A_TASKS = 200
B_TASKS = 5
STEADY = 20  # A's tasks completed before B arrives (the gate has learned the provider's limit)


def speech(text: str) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(character_id="char_001", text=text, voice_style="calm"),
    )


@contextlib.asynccontextmanager
async def stack(
    nats_server: NatsServer,
    tmp_path: Path,
    store: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[StoreClient, WorkerApp, RunningEmulator]]:
    """task_store, a TTS worker and the emulator; ``store`` and ``worker``: settings to change."""
    config = EmulatorConfig(latency_min=0.05, latency_max=0.05, max_concurrency=SLOTS, seed=3)
    async with contextlib.AsyncExitStack() as s:
        emu = await s.enter_async_context(running_emulator(config))
        settings = Settings(
            nats_url=nats_server.url,
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path / 'tasks.db'}",
            dispatch_buffer=BUFFER,
            reuse_ttl_seconds=0.0,  # every line is new anyway
            shutdown_grace_seconds=1.0,
        ).model_copy(update=store or {})
        app = await s.enter_async_context(TaskStoreApp(settings, listen_addr="127.0.0.1:0"))
        worker_settings = TtsWorkerSettings(
            nats_url=nats_server.url,
            task_store_addr=f"127.0.0.1:{app.port}",
            tts_api_base_url=emu.api_base,
            provider_allow_private_urls=True,
            tts_concurrency=16,
            long_poll_seconds=1.0,
            shutdown_grace_seconds=1.0,
        ).model_copy(update=worker or {})
        worker_app = await s.enter_async_context(build(worker_settings))
        client = await s.enter_async_context(StoreClient(f"127.0.0.1:{app.port}"))
        yield client, worker_app, emu


async def events_of(client: StoreClient, tenant: str) -> list[task_pb2.TaskEvent]:
    events: list[task_pb2.TaskEvent] = []
    after = 0
    while True:
        page = await client.list_events(
            spb.ListEventsRequest(tenant=tenant, after_sequence=after, limit=5000)
        )
        if not page.events:
            return events
        events += page.events
        after = page.events[-1].sequence


def of_type(events: list[task_pb2.TaskEvent], kind: int) -> list[task_pb2.TaskEvent]:
    return [e for e in events if e.type == kind]


async def completed(client: StoreClient, tenant: str) -> int:
    return len(of_type(await events_of(client, tenant), EV.TASK_EVENT_TYPE_COMPLETED))


def started_around(a_events: list[task_pb2.TaskEvent], b_events: list[task_pb2.TaskEvent]) -> tuple[int, int]:
    """A's tasks started before B's first create, and between it and B's first start."""
    b_created = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_QUEUED))
    b_started = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_STARTED))
    a_starts = [e.sequence for e in of_type(a_events, EV.TASK_EVENT_TYPE_STARTED)]
    return sum(1 for s in a_starts if s < b_created), sum(1 for s in a_starts if b_created < s < b_started)


def describe_between(a_events: list[task_pb2.TaskEvent], b_events: list[task_pb2.TaskEvent]) -> list[str]:
    """The log from B's first create to B's first start, for a failure's message."""
    b_created = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_QUEUED))
    b_started = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_STARTED))
    window = [e for e in a_events + b_events if b_created <= e.sequence <= b_started]
    return [
        f"{e.sequence} {EV.Name(e.type)} {e.task.id[-6:]} attempt {e.task.attempt}"
        for e in sorted(window, key=lambda e: e.sequence)
    ]


async def test_a_tenant_queueing_after_a_long_backlog_starts_within_a_round_of_the_slots(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with stack(nats_server, tmp_path) as (client, worker, emu):
        a_tasks = [await client.create_task("tenant-a", speech(f"line a{i}")) for i in range(A_TASKS)]
        await eventually(lambda: completed(client, "tenant-a"), timeout=60)

        async def steady() -> bool:
            return await completed(client, "tenant-a") >= STEADY

        await eventually(steady, timeout=120)
        calls_before_b = len(emu.state.call_log)
        b_tasks = [await client.create_task("tenant-b", speech(f"line b{i}")) for i in range(B_TASKS)]

        async def all_done() -> bool:
            done = await completed(client, "tenant-a") + await completed(client, "tenant-b")
            return done == A_TASKS + B_TASKS

        await eventually(all_done, timeout=300, interval=0.2)

        a_events, b_events = await events_of(client, "tenant-a"), await events_of(client, "tenant-b")
        a_before, a_between = started_around(a_events, b_events)
        # B really arrived behind a long backlog: most of A's tasks had not started yet.
        assert A_TASKS - a_before >= A_TASKS // 2, (a_before, A_TASKS)
        # The first claim after B's create runs B's first task (held, or released just before)
        # instead of the A job it claimed (B holds tasks and has none running): no A task starts
        # in between (a lost attempt's takeover would, none is expected here; one is allowed),
        # where a FIFO lane would start A's whole remaining backlog first (170+) and the released
        # buffer and the worker's prefetch alone 6.
        between = describe_between(a_events, b_events)
        assert a_between <= 1, f"{a_between} of A's tasks started between B's create and its first: {between}"
        # At the worker's gate it goes before the A jobs claimed earlier, so it reaches the
        # provider at the next free slot. In between come only A's calls that took a slot freed
        # while that claim was on its way (the jobs claimed ahead waiting at the gate: at most
        # the prefetch and the gate's probe; on a quiet machine 0 or 1), where without the
        # hand-over and the gate's order the released buffer and all of them would come first.
        # Only a task's first call counts: one the provider refused (429) is made again within its
        # attempt once the Retry-After is waited out, holding its slot, whenever that falls (the
        # emulator here admits few calls at once; CI found a retry of A's 10th task among them).
        assert worker.runner is not None
        calls = list(emu.state.call_log)
        seen = {record.text for record in calls[:calls_before_b]}
        texts = [record.text for record in calls[calls_before_b:]]
        firsts = []
        for text in texts:
            if text not in seen:
                seen.add(text)
                firsts.append(text)
        first_b = next(i for i, text in enumerate(firsts) if text.startswith("line b"))
        assert first_b <= worker.runner.config.prefetch + 1, f"{first_b} of A's tasks called first: {texts}"
        # Everything completed, each task once.
        a_done = {e.task.id for e in of_type(a_events, EV.TASK_EVENT_TYPE_COMPLETED)}
        b_done = {e.task.id for e in of_type(b_events, EV.TASK_EVENT_TYPE_COMPLETED)}
        assert a_done == {t.id for t in a_tasks}
        assert b_done == {t.id for t in b_tasks}


async def test_a_handed_over_task_whose_worker_dies_runs_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The worker running B's first task (handed to its claim of one of A's jobs) is killed during
    the provider call: the claimed A job was put back (its message is answered DONE when it comes
    again), and B's task, RUNNING under a lease with no message of its own, is found by the
    sweeper once the lease ran out, redispatched and run as attempt 2 (WORKER_LOST). Every task
    completes once."""
    store = {"lease_seconds": 1.5, "redispatch_after_seconds": 0.5, "sweep_interval_seconds": 0.2}
    worker = {"ack_wait_seconds": 2.0, "provider_shared_limits": False}
    async with stack(nats_server, tmp_path, store, worker) as (client, first, emu):
        a_tasks = [
            await client.create_task("tenant-a", speech(f"line a{i} [[latency:0.3]]")) for i in range(12)
        ]

        async def a_running() -> bool:
            return bool(of_type(await events_of(client, "tenant-a"), EV.TASK_EVENT_TYPE_STARTED))

        await eventually(a_running, timeout=60)
        b_task = await client.create_task("tenant-b", speech("line b0 [[hang*1:60]]"))

        async def b_running() -> bool:
            return (await client.get_task("tenant-b", b_task.id)).status == task_pb2.TASK_STATUS_RUNNING

        def b_calling() -> bool:
            return any(record.text.startswith("line b0") for record in list(emu.state.call_log))

        await eventually(b_running, timeout=60)
        # RUNNING is not enough: a task pushed to the worker is RUNNING from its create on, before
        # its call leaves (CI found the crash before it, and attempt 2's call the hanging one).
        await eventually(b_calling, timeout=60)
        await crash_worker(first)
        assert isinstance(first.settings, TtsWorkerSettings)
        async with build(first.settings.model_copy(update={"worker_id": "second"})):

            async def all_done() -> bool:
                a_done, b_done = await completed(client, "tenant-a"), await completed(client, "tenant-b")
                return (a_done, b_done) == (len(a_tasks), 1)

            await eventually(all_done, timeout=120, interval=0.2)
        a_events, b_events = await events_of(client, "tenant-a"), await events_of(client, "tenant-b")
        assert started_around(a_events, b_events)[1] <= 1, "B's task was not handed to the next claim"
        starts = of_type(b_events, EV.TASK_EVENT_TYPE_STARTED)
        assert [e.task.attempt for e in starts] == [1, 2], [e.task.attempt for e in starts]
        assert starts[1].task.error.code == task_pb2.ERROR_CODE_WORKER_LOST
        a_done = [e.task.id for e in of_type(a_events, EV.TASK_EVENT_TYPE_COMPLETED)]
        assert sorted(a_done) == sorted(t.id for t in a_tasks)


async def test_a_job_put_back_by_a_hand_over_runs_when_released_again_while_its_old_message_is_busy(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's first task is handed to the worker's claim of one of A's jobs and runs for 5 s under
    that job's message; the job, put back, is released again (a new dispatch generation) and its
    new message reaches the same worker meanwhile. It is claimed and run like any job. The worker
    took it for a redelivery of the message in hand (it matched the task id alone) and sent it
    back for 5 s, while task_store counted it in the lane's buffer of 2 and released nothing more:
    the whole lane stopped (a hunt saw 4.3-4.7 s stalls in 6 of 70 newcomers). Here that wait is
    an hour, so the old behaviour cannot finish in time."""
    monkeypatch.setattr(jobs, "_REDELIVERED_WAIT", 3600.0)
    async with stack(nats_server, tmp_path) as (client, _, _emu):
        a_tasks = [
            await client.create_task("tenant-a", speech(f"line a{i} [[latency:0.3]]")) for i in range(12)
        ]

        async def a_running() -> bool:
            return bool(of_type(await events_of(client, "tenant-a"), EV.TASK_EVENT_TYPE_STARTED))

        await eventually(a_running, timeout=60)
        await client.create_task("tenant-b", speech("line b0 [[latency:5]]"))

        async def all_done() -> bool:
            return (await completed(client, "tenant-a"), await completed(client, "tenant-b")) == (
                len(a_tasks),
                1,
            )

        await eventually(all_done, timeout=90, interval=0.2)
        a_events, b_events = await events_of(client, "tenant-a"), await events_of(client, "tenant-b")
        assert started_around(a_events, b_events)[1] <= 1, describe_between(a_events, b_events)
