"""The gateway's bus subscription follows its watch streams (``charai.gateway.events.EventHub``),
against a real nats-server: none while nobody watches, made and registered with NATS for the first
stream before that stream reads the event log (``ready``), kept while streams come and go, and
dropped once the last one has been gone for the idle time.

Absence is shown by order, not by waiting: NATS delivers one connection's messages in the order
they were published, so a batch that arrives after one published earlier proves the earlier one
found no subscription.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from charai.core import natsconn
from charai.core.topology import Topology
from charai.gateway.events import EventHub, Watcher
from charai.store.v1 import store_service_pb2 as spb
from nats.aio.client import Client

from tests.conftest import eventually

if TYPE_CHECKING:
    from tests.conftest import NatsServer

TOPOLOGY = Topology()
TENANT = "t1"


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def hub_on(nats_server: NatsServer, **options: float) -> AsyncIterator[EventHub]:
    """A hub on a connection of its own, closed (and its connection) afterwards."""
    hub_nc = await nats.connect(nats_server.url)
    hub = EventHub(hub_nc, TOPOLOGY, **options)
    try:
        await hub.start()
        yield hub
    finally:
        await hub.close()
        await hub_nc.close()


async def publish(nc: Client, task_id: str) -> None:
    """One task_store bus message: an EventBatch with one event of ``task_id``."""
    env = spb.EventEnvelope(tenant=TENANT)
    env.event.task.id = task_id
    await nc.publish(TOPOLOGY.events_subject, spb.EventBatch(envelopes=[env]).SerializeToString())
    await natsconn.roundtrip(nc)  # routed (to no one, or to the hub) before this returns


async def received(watcher: Watcher) -> list[str]:
    """The task ids of what reached ``watcher``, waiting for the first (generously)."""
    items = await watcher.take(timeout=10)
    return [item.env.event.task.id for item in items if item is not None]


async def test_no_subscription_until_a_stream_is_ready_then_every_event_from_there(
    nats_server: NatsServer, nc: Client
) -> None:
    async with hub_on(nats_server) as hub:
        watcher = Watcher(tenant=TENANT)
        hub.add(watcher)
        assert not hub.subscribed  # add() alone subscribes nothing: the stream asks (ready)

        await publish(nc, "task_before")
        await hub.ready()
        assert hub.subscribed and hub.subscriptions == 1
        await publish(nc, "task_after")

        assert await received(watcher) == ["task_after"]  # the first found no subscription


async def test_the_subscription_outlives_the_last_stream_for_the_idle_time_only(
    nats_server: NatsServer, nc: Client
) -> None:
    async with hub_on(nats_server, idle_seconds=0.0) as hub:
        first = Watcher(tenant=TENANT)
        hub.add(first)
        await hub.ready()
        hub.remove(first)
        await eventually(lambda: not hub.subscribed, timeout=10)
        await publish(nc, "task_unwatched")

        second = Watcher(tenant=TENANT, task_id="task_watched")
        hub.add(second)
        await hub.ready()
        await publish(nc, "task_watched")

        assert await received(second) == ["task_watched"]
        assert hub.subscriptions == 2


async def test_a_stream_that_comes_back_within_the_idle_time_keeps_the_subscription(
    nats_server: NatsServer, nc: Client
) -> None:
    async with hub_on(nats_server, idle_seconds=3600.0) as hub:
        first = Watcher(tenant=TENANT)
        hub.add(first)
        await hub.ready()
        hub.remove(first)
        assert hub.subscribed
        again = Watcher(tenant=TENANT)
        hub.add(again)
        await hub.ready()
        await publish(nc, "task_x")

        assert await received(again) == ["task_x"]
        assert hub.subscriptions == 1
    assert not hub.subscribed  # closed
