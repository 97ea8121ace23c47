"""task_store through its gRPC API (a real ``grpc.aio`` server on port 0 inside TaskStoreApp,
connected to a real nats-server), on both backends: validation at the door stores nothing,
tenants are kept apart, and a restart keeps every task and continues the sequences. The store's
own contract is ``test_store_contract.py``."""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.taskapi import error_details
from charai.tasks.v1 import task_service_pb2
from charai.tasks.v1.task_service_pb2 import RedeliverWebhookRequest as RedeliverRequest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from tests.integration.conftest import Database, sqlite_database
from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    EV,
    IMAGE,
    QUEUED,
    RUN,
    RUNNING,
    image_request,
    image_result,
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
    fields = [field for field, _ in error_details(exc).field_violations]
    assert fields, "INVALID_ARGUMENT without google.rpc.BadRequest details"
    return fields


def refused_fields(error: bytes) -> list[str]:
    """The fields an Exchange answer's refusal names (its ``google.rpc.Status`` details)."""
    status = status_pb2.Status.FromString(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], status
    found = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(found)
    return [v.field for v in found.field_violations]


async def test_grpc_rejects_invalid_create_and_stores_nothing(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (app, client):
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
                await client.create_task("t1", request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            fields = bad_fields(err.value)
            assert expected <= set(fields), fields

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_task("t1", bad_image)
        assert any(f.startswith("metadata[") for f in bad_fields(err.value))

        listed = await client.list_tasks("t1", task_service_pb2.ListTasksRequest())
        assert list(listed.tasks) == []
        events = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert (list(events.events), events.head_sequence) == ([], 0)
        assert app.store is not None
        assert await app.store.pending_dispatches() == []
        counts = [await db.count_rows(table) for table in ("tasks", "events", "outbox")]
        assert counts == [0, 0, 0]

        # A bad page token is INVALID_ARGUMENT naming page_token, through the API too.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.list_tasks("t1", task_service_pb2.ListTasksRequest(page_token="%%%"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err.value) == ["page_token"]


async def test_grpc_names_forged_page_tokens_and_values_out_of_range_and_stores_nothing(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # Numbers no database column holds, and a batch naming its bad request: each is
    # INVALID_ARGUMENT naming its field, never a crash that the gateway answers UNAVAILABLE.
    huge = base64.urlsafe_b64encode(b"99999999999999999999:task_x").decode()
    huge_offset = base64.urlsafe_b64encode(b"99999999999999999999999").decode()
    async with running_app(app_settings(nats_server, tmp_path, db)) as (app, client):
        calls = [
            (client.list_tasks("t1", task_service_pb2.ListTasksRequest(page_token=huge)), "page_token"),
            (
                client.list_webhook_deliveries(
                    "t1", task_service_pb2.ListWebhookDeliveriesRequest(page_token=huge)
                ),
                "page_token",
            ),
            (client.get_usage("t1", task_service_pb2.GetUsageRequest(page_token=huge_offset)), "page_token"),
            (client.redeliver_webhook("t1", RedeliverRequest(since=Timestamp(seconds=10**12))), "since"),
            (client.redeliver_webhook("t1", RedeliverRequest(since=Timestamp(seconds=1, nanos=-5))), "since"),
            (client.redeliver_webhook("t1", RedeliverRequest(delivery_id="x" * 5000)), "delivery_id"),
            (
                client.redeliver_webhook("t1", RedeliverRequest(delivery_id="msg_" + "0" * 32 + "\n")),
                "delivery_id",
            ),
        ]
        for call, field in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert bad_fields(err.value) == [field]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.redeliver_webhook("t1", RedeliverRequest(delivery_id="msg_" + "0" * 32))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # well formed, and nobody's

        # A request_id another type took, in a batch: the request is named by its index.
        # As unary calls, and as commands of one Exchange call (the gateway's way), where the
        # batch shares its transaction with another caller's create.
        await client.create_task("t1", image_request(request_id="r1"))
        batch = [image_request(request_id="r2"), tts_request(request_id="r1")]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.batch_create_tasks("t1", batch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err.value) == ["requests[1].request_id"]
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a single create: the field alone
            await client.create_task("t1", tts_request(request_id="r1"))
        assert bad_fields(err.value) == ["request_id"]
        commands = [
            spb.StoreCommand(batch_create=spb.BatchCreateTasksRequest(tenant="t1", requests=batch)),
            spb.StoreCommand(create=spb.CreateTaskRequest(tenant="t1", request=tts_request(request_id="r1"))),
            spb.StoreCommand(create=spb.CreateTaskRequest(tenant="t1", request=tts_request())),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = store_service_pb2_grpc.TaskStoreServiceStub(channel)
            answers = (await stub.Exchange(spb.ExchangeRequest(commands=commands))).answers
        assert [refused_fields(a.error) for a in answers[:2]] == [["requests[1].request_id"], ["request_id"]]
        assert answers[2].create.task.id  # the others' refusals are theirs alone
        assert await db.count_rows("tasks") == 2  # r1's image and the last; r2 was rolled back


async def test_grpc_hides_other_tenants_tasks(nats_server: NatsServer, tmp_path: Path, db: Database) -> None:
    async with running_app(app_settings(nats_server, tmp_path, db)) as (_, client):
        created = await client.create_task("alice", image_request())
        task_id = created.id
        for call in (
            client.get_task("bob", task_id),
            client.cancel_task("bob", task_id),
            client.get_task("alice", "task_" + "0" * 32),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bob_list = await client.list_tasks("bob", task_service_pb2.ListTasksRequest())
        assert list(bob_list.tasks) == []
        bob_events = await client.list_events(spb.ListEventsRequest(tenant="bob", task_id=task_id))
        assert list(bob_events.events) == []
        mine = await client.get_task("alice", task_id)
        assert mine.status == QUEUED  # bob's cancel changed nothing


async def test_restart_keeps_tasks_and_continues_sequences(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    settings = app_settings(nats_server, tmp_path, db)
    async with running_app(settings) as (_, client):
        ids = []
        for i in range(3):
            created = await client.create_task("t1", image_request(f"c{i}", request_id=f"r{i}"))
            ids.append(created.id)
        claim = await client.claim_task(ids[0], 1, "w")
        assert claim.outcome == RUN
        await client.report_progress(ids[0], 1, 40, "generating")
        await client.cancel_task("t1", ids[1])
        before = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert before.head_sequence == 6

    async with running_app(settings) as (_, client):
        after = await client.list_events(spb.ListEventsRequest(tenant="t1"))
        assert list(after.events) == list(before.events)
        assert after.head_sequence == before.head_sequence
        running = await client.get_task("t1", ids[0])
        assert (running.status, running.progress, running.attempt) == (RUNNING, 40, 1)
        cancelled = await client.get_task("t1", ids[1])
        assert cancelled.status == CANCELLED
        # request_id still deduplicates after the restart.
        again = await client.create_task("t1", image_request("c2", request_id="r2"))
        assert again.id == ids[2]
        # The running attempt can still finish, and sequences continue where they stopped.
        done = await client.complete_task(ids[0], 1, image_result())
        assert done.status == COMPLETED
        new = await client.create_task("t1", tts_request())
        events = await client.list_events(
            spb.ListEventsRequest(tenant="t1", after_sequence=before.head_sequence)
        )
        assert [(e.sequence, e.type, e.task.id) for e in events.events] == [
            (7, EV.TASK_EVENT_TYPE_COMPLETED, ids[0]),
            (8, EV.TASK_EVENT_TYPE_QUEUED, new.id),
        ]
        listed = await client.list_tasks("t1", task_service_pb2.ListTasksRequest())
        assert [t.id for t in listed.tasks] == [new.id, *reversed(ids)]


# -- SQLite only -----------------------------------------------------------------------------
async def test_sqlite_file_is_in_wal_mode_after_the_app_ran(nats_server: NatsServer, tmp_path: Path) -> None:
    """SQLite only, by nature: WAL (readers never block the single writer) is a property of the
    SQLite file; PostgreSQL has no journal mode to check. Not parametrized rather than skipped."""
    path = tmp_path / "tasks.db"
    sqlite_db = sqlite_database(path)
    async with running_app(app_settings(nats_server, tmp_path, sqlite_db)) as (_, client):
        await client.create_task("t1", image_request())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await sqlite_db.count_rows("tasks") == 1
