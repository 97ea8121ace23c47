"""Fair share through the real stack: task_store (SQLite) + nats-server + a TTS worker + the
provider emulator admitting 2 calls at once, each call slow (latency).

Tenant A queues a long backlog of slow tasks; once the lane runs steadily, tenant B queues 5.
B's first task must start within about one round of the provider's slots, not behind A's
backlog: judged by the order of events in the log (sequence numbers are commit order), never by
time. And A's tasks all still complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from charai.core.storeclient import StoreClient
from charai.emulator import EmulatorConfig, running_emulator
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.tts_worker.app import build
from charai.worker.app import WorkerApp
from charai.worker.settings import TtsWorkerSettings

from tests.conftest import eventually

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
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[StoreClient, WorkerApp]]:
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
        )
        app = await s.enter_async_context(TaskStoreApp(settings, listen_addr="127.0.0.1:0"))
        worker = await s.enter_async_context(
            build(
                TtsWorkerSettings(
                    nats_url=nats_server.url,
                    task_store_addr=f"127.0.0.1:{app.port}",
                    tts_api_base_url=emu.api_base,
                    provider_allow_private_urls=True,
                    tts_concurrency=16,
                    long_poll_seconds=1.0,
                    shutdown_grace_seconds=1.0,
                )
            )
        )
        client = await s.enter_async_context(StoreClient(f"127.0.0.1:{app.port}"))
        yield client, worker


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


async def test_a_tenant_queueing_after_a_long_backlog_starts_within_a_round_of_the_slots(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with stack(nats_server, tmp_path) as (client, worker):
        a_tasks = [await client.create_task("tenant-a", speech(f"line a{i}")) for i in range(A_TASKS)]
        await eventually(lambda: completed(client, "tenant-a"), timeout=60)

        async def steady() -> bool:
            return await completed(client, "tenant-a") >= STEADY

        await eventually(steady, timeout=120)
        b_tasks = [await client.create_task("tenant-b", speech(f"line b{i}")) for i in range(B_TASKS)]

        async def all_done() -> bool:
            done = await completed(client, "tenant-a") + await completed(client, "tenant-b")
            return done == A_TASKS + B_TASKS

        await eventually(all_done, timeout=300, interval=0.2)

        a_events, b_events = await events_of(client, "tenant-a"), await events_of(client, "tenant-b")
        b_created = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_QUEUED))
        b_started = min(e.sequence for e in of_type(b_events, EV.TASK_EVENT_TYPE_STARTED))
        a_starts = [e.sequence for e in of_type(a_events, EV.TASK_EVENT_TYPE_STARTED)]
        a_before = sum(1 for s in a_starts if s < b_created)
        a_between = sum(1 for s in a_starts if b_created < s < b_started)
        # B really arrived behind a long backlog: most of A's tasks had not started yet.
        assert A_TASKS - a_before >= A_TASKS // 2, (a_before, A_TASKS)
        # The worker holds at most the gate's limit + its prefetch (the limit is the provider's 2,
        # or 3 while the gate probes upward); the store keeps that many released (or the buffer,
        # if more) and releases B's task at the next claim. So before B's first start come at
        # most one such round of A's tasks, and one more released as B arrived: 6 here, where a
        # FIFO lane would start A's whole remaining backlog first (170+).
        assert worker.runner is not None
        round_ = max(BUFFER, SLOTS + 1 + worker.runner.config.prefetch)
        assert a_between <= round_ + 1, f"{a_between} of A's tasks started between B's create and its first"
        # Everything completed, each task once.
        a_done = {e.task.id for e in of_type(a_events, EV.TASK_EVENT_TYPE_COMPLETED)}
        b_done = {e.task.id for e in of_type(b_events, EV.TASK_EVENT_TYPE_COMPLETED)}
        assert a_done == {t.id for t in a_tasks}
        assert b_done == {t.id for t in b_tasks}
