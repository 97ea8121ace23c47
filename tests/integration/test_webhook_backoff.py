"""Deliveries waiting for their next attempt, or for a receiver that hangs, hold nobody else up:
a real task_store (its relay publishing to a real NATS), a real webhook sender in this process
and real HTTP receivers.

A delivery whose attempt failed waits for its next one as a JetStream message nak'd with that
delay, which the consumer counts as not yet acknowledged. With the sender's consumer bounded
to a few times its concurrency, one receiver failing for more tasks than that stalled every
tenant's deliveries until the first delay ended (here ten minutes, in production up to hours).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from charai.core import natsconn
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.task_store.app import TaskStoreApp
from charai.tasks.v1 import task_pb2
from charai.webhook_sender.sender import Sender
from nats.js import api as js_api

from tests.conftest import eventually
from tests.integration.conftest import Database
from tests.integration.store_requests import image_request, image_result
from tests.integration.test_task_store_api import app_settings
from tests.webhook_receiver import Receiver

if TYPE_CHECKING:
    from tests.conftest import NatsServer

#: The sender's slots; its consumer was bounded to 4 times as many unacknowledged jobs.
SLOTS = 2
FAILING = 12


@contextlib.asynccontextmanager
async def sending(
    nats_server: NatsServer,
    tmp_path: Path,
    db: Database,
    nats_errors: list[Exception] | None = None,
    **sender_args: Any,
) -> AsyncIterator[tuple[StoreClient, Sender]]:
    settings = app_settings(
        nats_server, tmp_path, db, webhook_retry_schedule=("0", "600"), webhook_disable_after=0
    )
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}", coalesce=True, stream=True) as store,
    ):

        async def on_error(exc: Exception) -> None:
            if nats_errors is not None:
                nats_errors.append(exc)

        nc = await nats.connect(nats_server.url, error_cb=on_error)
        sender = Sender(
            nc.jetstream(), store, Topology(), sender_id="s1", present=lambda t: t,
            allow_private=True, **{"concurrency": SLOTS, **sender_args},
        )  # fmt: skip
        try:
            await sender.start()
            yield store, sender
        finally:
            await sender.close(grace=1)
            await nc.close()


async def completed_with_webhook(store: StoreClient, url: str) -> None:
    request = image_request()
    request.webhook.CopyFrom(task_pb2.Webhook(url=url, events=["completed"]))
    task = await store.create_task("acme", request)
    claim = await store.claim_task(task.id, 1, "w1")
    await store.complete_task(task.id, claim.attempt, image_result())


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_deliveries_waiting_for_a_retry_do_not_hold_up_the_others(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with Receiver() as receiver, sending(nats_server, tmp_path, db) as (store, sender):
        for _ in range(FAILING):
            await completed_with_webhook(store, f"{receiver.url}/down")
        # Each first attempt is made (503) and waits ten minutes for its next one.
        await eventually(lambda: len({h.id for h in receiver.hits if h.path == "/down"}) == FAILING, 60)
        await completed_with_webhook(store, f"{receiver.url}/ok")
        await eventually(lambda: any(h.path == "/ok" for h in receiver.hits), 60)
        assert len([h for h in receiver.hits if h.path == "/down"]) == FAILING  # no second attempt yet
        info = await sender._sub.consumer_info()
        assert info.num_ack_pending == FAILING  # the waiting ones, counted by JetStream
        assert info.config.max_ack_pending == 100_000


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_a_consumer_an_older_sender_made_is_given_the_new_bound(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    topology = Topology()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, topology, 1)
        older = js_api.ConsumerConfig(
            durable_name=topology.webhook_consumer,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_deliver=-1,
            max_ack_pending=SLOTS * 4,
            filter_subject=topology.webhook_subject,
        )
        await js.add_consumer(topology.jobs_stream, older)
        async with sending(nats_server, tmp_path, db):
            info = await js.consumer_info(topology.jobs_stream, topology.webhook_consumer)
            assert info.config.max_ack_pending == 100_000
    finally:
        await nc.close()


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_a_receiver_that_hangs_gets_its_share_of_the_slots_and_the_others_the_rest(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with (
        Receiver() as hanging,
        Receiver() as healthy,
        sending(nats_server, tmp_path, db, concurrency=4, receiver_concurrency=2, timeout=120) as (
            store,
            sender,
        ),
    ):
        hanging.gate.clear()  # it reads each request and answers nothing for now
        try:
            for _ in range(6):
                await completed_with_webhook(store, f"{hanging.url}/ok")
            await eventually(lambda: len(hanging.arrived) >= 2 and sender.parked >= 1, 60)
            assert len(hanging.arrived) == 2  # two of the four slots; the other deliveries wait in JetStream
            await completed_with_webhook(store, f"{healthy.url}/ok")
            await eventually(lambda: len(healthy.hits) == 1, 60)
        finally:
            hanging.gate.set()
        await eventually(lambda: len({h.id for h in hanging.hits}) == 6, 90)
        assert [h.answered for h in hanging.hits] == [200] * 6  # each sent once, none failed


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_a_sender_that_stopped_lets_its_connection_drain_at_once(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # The pull request of the fetch close() cancelled stayed on the server for up to 5 s; a job
    # published meanwhile landed in the subscription, nobody read it, and the connection's drain
    # waited for it until nats-py gave up (30 s): SIGTERM took 30 s, beyond the shutdown grace.
    errors: list[Exception] = []
    topology = Topology()
    async with Receiver() as receiver, sending(nats_server, tmp_path, db, errors) as (store, sender):
        await completed_with_webhook(store, f"{receiver.url}/ok")
        await eventually(lambda: len(receiver.hits) == 1, 60)
        await sender.close(grace=1)
        await completed_with_webhook(store, f"{receiver.url}/ok")  # published as the sender stopped

        async def counted() -> bool:  # waiting in the stream, or handed to the stale request
            info = await sender._js.consumer_info(topology.jobs_stream, topology.webhook_consumer)
            return bool(info.num_pending + info.num_ack_pending == 1)

        await eventually(counted, 30)
        await sender._js._nc.drain()
        assert not [e for e in errors if isinstance(e, nats.errors.DrainTimeoutError)]
        assert len(receiver.hits) == 1  # the job waits for the next sender
