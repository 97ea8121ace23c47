"""``ExchangeStream`` on a real task_store (both backends): requests answered by id on one call,
a request refused as a whole answered with ``error`` while the stream goes on, streams ended
cleanly when task_store shuts down, and the coalescing StoreClient sending a request again on a
new stream once task_store is back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from charai.core.coalesce import answer_error
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc as spb_grpc
from charai.task_store.app import TaskStoreApp
from charai.task_store.grpc_api import MAX_EXCHANGE
from charai.tasks.v1 import task_pb2 as tpb

from tests.conftest import eventually
from tests.integration.conftest import Database
from tests.integration.store_requests import image_request
from tests.integration.test_task_store_api import app_settings

if TYPE_CHECKING:
    from tests.conftest import NatsServer


def stream_request(id_: int, commands: list[spb.StoreCommand]) -> spb.ExchangeStreamRequest:
    return spb.ExchangeStreamRequest(id=id_, request=spb.ExchangeRequest(commands=commands))


def create(tenant: str = "acme") -> spb.StoreCommand:
    return spb.StoreCommand(create=spb.CreateTaskRequest(tenant=tenant, request=image_request()))


async def test_requests_on_one_stream_are_answered_by_id_and_a_refused_one_leaves_it_open(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with (
        TaskStoreApp(app_settings(nats_server, tmp_path, db), listen_addr="127.0.0.1:0") as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        call = spb_grpc.TaskStoreServiceStub(channel).ExchangeStream()
        await call.write(stream_request(7, [create()] * (MAX_EXCHANGE + 1)))
        await call.write(stream_request(8, [create(), create()]))
        await call.write(stream_request(9, [create()]))
        responses: dict[int, spb.ExchangeStreamResponse] = {}
        for _ in range(3):
            response = await call.read()
            assert isinstance(response, spb.ExchangeStreamResponse)
            responses[response.id] = response
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert set(responses) == {7, 8, 9}
    refused = answer_error(responses[7].error)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and not responses[7].HasField("response")
    made = [a.create.task.id for r in (responses[8], responses[9]) for a in r.response.answers]
    assert len(made) == 3 and len(set(made)) == 3 and all(made)


async def test_task_store_ends_its_streams_cleanly_when_it_shuts_down(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with TaskStoreApp(app_settings(nats_server, tmp_path, db), listen_addr="127.0.0.1:0") as app:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        call = spb_grpc.TaskStoreServiceStub(channel).ExchangeStream()
        await call.write(stream_request(1, [create()]))
        answered = await call.read()
        assert isinstance(answered, spb.ExchangeStreamResponse) and answered.id == 1
    # The app has stopped: the stream ended with OK (answered, not cut off at the grace period).
    try:
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await channel.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_request_is_sent_again_on_a_new_stream_once_task_store_is_back(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    settings = app_settings(nats_server, tmp_path, db)
    async with StoreClient(addr, coalesce=True, stream=True) as client:
        async with TaskStoreApp(settings, listen_addr=addr):
            first = await client.create_task("acme", image_request())
        # task_store is down: the next create waits for it (wait-for-ready), then goes through.
        pending = asyncio.create_task(client.create_task("acme", image_request(), timeout=60))
        await asyncio.sleep(0)
        async with TaskStoreApp(settings, listen_addr=addr):
            second = await pending
            assert (await client.get_task("acme", first.id)).id == first.id
    assert second.id and second.id != first.id


async def test_a_request_given_up_while_task_store_is_down_leaves_no_broken_stream(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    async with StoreClient(addr, coalesce=True, stream=True) as client:
        # Nobody listens: the stream waits to connect, the request's deadline passes under its write.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await client.create_task("acme", image_request(), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        async with TaskStoreApp(app_settings(nats_server, tmp_path, db), listen_addr=addr):
            made = await client.create_task("acme", image_request(), timeout=60)
    assert made.id


async def test_a_standing_offer_stands_again_once_task_store_is_back(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    """Push dispatch: an offer lives in task_store's memory and dies with its stream. A worker
    that offered before a restart is offered again on the new stream as soon as it opens (any
    call opens it), so it is pushed jobs without waiting for its free slots to change."""
    addr = f"127.0.0.1:{_free_port()}"
    settings = app_settings(nats_server, tmp_path, db)
    pushed: list[spb.PushedJob] = []
    image = tpb.TASK_TYPE_IMAGE_GENERATION
    async with StoreClient(addr, coalesce=True, stream=True) as worker:
        worker.on_push(pushed.append)
        async with TaskStoreApp(settings, listen_addr=addr) as first:
            assert await worker.offer("w1", [image], 2)
            assert first.offers is not None
            await eventually(lambda: first.offers is not None and first.offers.open == 1)
        async with TaskStoreApp(settings, listen_addr=addr) as second, StoreClient(addr) as client:
            assert second.offers is not None and second.offers.open == 0
            with contextlib.suppress(grpc.aio.AioRpcError):  # a worker's command opens a new stream
                await worker.report_progress("task_nonexistent", 1, 20, "generating", timeout=30)
            await eventually(lambda: second.offers is not None and second.offers.open == 1)
            task = await client.create_task("acme", image_request())
            await eventually(lambda: len(pushed) == 1)
    assert pushed[0].job.task_id == task.id
    assert pushed[0].claim.outcome == spb.CLAIM_OUTCOME_RUN and pushed[0].claim.attempt == 1
