"""task_store through its gRPC API (a real ``grpc.aio`` server on port 0 inside TaskStoreApp,
connected to a real nats-server), on both backends: validation at the door stores nothing,
tenants are kept apart, and a restart keeps every task and continues the sequences. The store's
own contract is ``test_store_contract.py``."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.tasks.v1 import task_service_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.integration.conftest import Database, sqlite_database
from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    EV,
    IMAGE,
    QUEUED,
    RUN,
    RUNNING,
    complete_req,
    image_request,
    tts_request,
)

if TYPE_CHECKING:
    from tests.conftest import NatsServer


def app_settings(nats: NatsServer, tmp_path: Path, db: Database, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats.url,
        "data_dir": tmp_path,
        "database_url": db.url,
        "lease_seconds": 5.0,
        "retry_base_seconds": 0.05,
        "shutdown_grace_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[TaskStoreApp, StoreClient]]:
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}") as client,
    ):
        yield app, client


def bad_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "INVALID_ARGUMENT without google.rpc.Status details"
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_grpc_rejects_invalid_create_and_stores_nothing(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (app, client):
        stub = client.stub
        bad_image = image_request(prompt="")
        bad_image.image.resolution = "10x10"
        bad_image.metadata["1bad key"] = "x"
        bad_tts = tts_request()
        bad_tts.tts.speed = 9.0
        bad_tts.tts.response_format = "ogg"
        mismatched = tts_request()
        mismatched.type = IMAGE
        cases = [
            (bad_image, {"image.prompt", "image.resolution"}),
            (bad_tts, {"tts.speed", "tts.response_format"}),
            (mismatched, {"payload"}),
            (task_service_pb2.CreateTaskRequest(), {"type", "payload"}),
            (image_request(request_id="x" * 200), {"request_id"}),
        ]
        for request, expected in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateTask(spb.CreateTaskRequest(tenant="t1", request=request), **client.kw())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            fields = bad_fields(err.value)
            assert expected <= set(fields), fields

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateTask(spb.CreateTaskRequest(tenant="t1", request=bad_image), **client.kw())
        assert any(f.startswith("metadata[") for f in bad_fields(err.value))

        listed = await stub.ListTasks(spb.ListTasksRequest(tenant="t1"), **client.kw())
        assert list(listed.tasks) == []
        events = await stub.ListEvents(spb.ListEventsRequest(tenant="t1"), **client.kw())
        assert (list(events.events), events.head_sequence) == ([], 0)
        assert app.store is not None
        assert await app.store.pending_dispatches() == []
        counts = [await db.count_rows(table) for table in ("tasks", "events", "outbox")]
        assert counts == [0, 0, 0]

        # A bad page token is INVALID_ARGUMENT naming page_token, through the API too.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListTasks(
                spb.ListTasksRequest(
                    tenant="t1", request=task_service_pb2.ListTasksRequest(page_token="%%%")
                ),
                **client.kw(),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err.value) == ["page_token"]


async def test_grpc_hides_other_tenants_tasks(nats_server: NatsServer, tmp_path: Path, db: Database) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (_, client):
        stub = client.stub
        created = await stub.CreateTask(
            spb.CreateTaskRequest(tenant="alice", request=image_request()), **client.kw()
        )
        task_id = created.task.id
        for call in (
            stub.GetTask(spb.GetTaskRequest(tenant="bob", id=task_id), **client.kw()),
            stub.CancelTask(spb.CancelTaskRequest(tenant="bob", id=task_id), **client.kw()),
            stub.GetTask(spb.GetTaskRequest(tenant="alice", id="task_" + "0" * 32), **client.kw()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bob_list = await stub.ListTasks(spb.ListTasksRequest(tenant="bob"), **client.kw())
        assert list(bob_list.tasks) == []
        bob_events = await stub.ListEvents(
            spb.ListEventsRequest(tenant="bob", task_id=task_id), **client.kw()
        )
        assert list(bob_events.events) == []
        mine = await stub.GetTask(spb.GetTaskRequest(tenant="alice", id=task_id), **client.kw())
        assert mine.task.status == QUEUED  # bob's cancel changed nothing


async def test_restart_keeps_tasks_and_continues_sequences(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    settings = app_settings(nats_server, tmp_path, db)
    async with running_app(settings) as (_, client):
        stub, kw = client.stub, client.kw()
        ids = []
        for i in range(3):
            created = await stub.CreateTask(
                spb.CreateTaskRequest(tenant="t1", request=image_request(f"c{i}", request_id=f"r{i}")), **kw
            )
            ids.append(created.task.id)
        claim = await stub.ClaimTask(
            spb.ClaimTaskRequest(task_id=ids[0], dispatch_gen=1, worker_id="w"), **kw
        )
        assert claim.outcome == RUN
        await stub.ReportProgress(
            spb.ReportProgressRequest(task_id=ids[0], attempt=1, progress=40, stage="generating"), **kw
        )
        await stub.CancelTask(spb.CancelTaskRequest(tenant="t1", id=ids[1]), **kw)
        before = await stub.ListEvents(spb.ListEventsRequest(tenant="t1"), **kw)
        assert before.head_sequence == 6

    async with running_app(settings) as (_, client):
        stub, kw = client.stub, client.kw()
        after = await stub.ListEvents(spb.ListEventsRequest(tenant="t1"), **kw)
        assert list(after.events) == list(before.events)
        assert after.head_sequence == before.head_sequence
        running = await stub.GetTask(spb.GetTaskRequest(tenant="t1", id=ids[0]), **kw)
        assert (running.task.status, running.task.progress, running.task.attempt) == (RUNNING, 40, 1)
        cancelled = await stub.GetTask(spb.GetTaskRequest(tenant="t1", id=ids[1]), **kw)
        assert cancelled.task.status == CANCELLED
        # request_id still deduplicates after the restart.
        again = await stub.CreateTask(
            spb.CreateTaskRequest(tenant="t1", request=image_request("c2", request_id="r2")), **kw
        )
        assert again.task.id == ids[2]
        # The running attempt can still finish, and sequences continue where they stopped.
        done = await stub.CompleteTask(complete_req(ids[0], 1), **kw)
        assert done.task.status == COMPLETED
        new = await stub.CreateTask(spb.CreateTaskRequest(tenant="t1", request=tts_request()), **kw)
        events = await stub.ListEvents(
            spb.ListEventsRequest(tenant="t1", after_sequence=before.head_sequence), **kw
        )
        assert [(e.sequence, e.type, e.task.id) for e in events.events] == [
            (7, EV.TASK_EVENT_TYPE_COMPLETED, ids[0]),
            (8, EV.TASK_EVENT_TYPE_QUEUED, new.task.id),
        ]
        listed = await stub.ListTasks(spb.ListTasksRequest(tenant="t1"), **kw)
        assert [t.id for t in listed.tasks] == [new.task.id, *reversed(ids)]


# -- SQLite only -----------------------------------------------------------------------------
async def test_sqlite_file_is_in_wal_mode_after_the_app_ran(nats_server: NatsServer, tmp_path: Path) -> None:
    """SQLite only, by nature: WAL (readers never block the single writer) is a property of the
    SQLite file; PostgreSQL has no journal mode to check. Not parametrized rather than skipped."""
    path = tmp_path / "tasks.db"
    sqlite_db = sqlite_database(path)
    async with running_app(app_settings(nats_server, tmp_path, sqlite_db)) as (_, client):
        await client.stub.CreateTask(
            spb.CreateTaskRequest(tenant="t1", request=image_request()), **client.kw()
        )
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await sqlite_db.count_rows("tasks") == 1
