"""``charai.core.natsconn.write_now``: what a publish buffered goes on the socket at once, not on
nats-py's flusher's next turn of the event loop (task_store's event publisher relies on it so that
a started event does not wait behind the create's answer and push). Real nats-server.

It works on nats-py internals (the client's buffer and transport); if a nats-py release moves
them, ``write_now`` only stops helping, and the first test here fails to say so.
"""

from __future__ import annotations

import asyncio

import nats
from charai.core.natsconn import write_now
from nats.aio.msg import Msg

from tests.conftest import NatsServer, eventually

DEADLINE = 20.0


async def test_write_now_sends_what_publish_buffered_exactly_once(nats_url: str) -> None:
    sub_nc = await nats.connect(nats_url)
    pub = await nats.connect(nats_url)
    try:
        got: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            await got.put(msg)

        await sub_nc.subscribe("write.now", cb=on_msg)
        await sub_nc.flush()
        # publish() buffers and only wakes the flusher: nothing is written until the loop turns.
        await pub.publish("write.now", b"one")
        assert pub.pending_data_size > 0
        assert write_now(pub)
        assert pub.pending_data_size == 0  # written: the flusher's turn finds nothing left
        async with asyncio.timeout(DEADLINE):
            msg = await got.get()
        assert msg.data == b"one"
        # Exactly once: a round trip through the server on each side, and nothing more came.
        await pub.flush()
        await sub_nc.flush()
        assert got.empty()
        assert not write_now(pub)  # nothing buffered
    finally:
        await pub.close()
        await sub_nc.close()


async def test_while_reconnecting_the_buffer_is_left_to_nats_py_and_sent_once_connected(
    nats_server: NatsServer,
) -> None:
    pub = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = pub.jetstream()
        # The stream keeps what reaches the server across its restart, whoever listens then.
        await js.add_stream(name="WRITE_LATER", subjects=["write.later"])
        nats_server.stop()
        await eventually(lambda: pub.is_reconnecting, DEADLINE)
        await pub.publish("write.later", b"kept")  # buffered for when the server is back
        assert not write_now(pub)
        assert pub.pending_data_size > 0
        nats_server.start()
        await eventually(lambda: pub.is_connected, DEADLINE)
        await pub.flush()  # the replayed buffer went out before this round trip's PING
        stored = await js.get_last_msg("WRITE_LATER", "write.later")
        assert stored.data == b"kept"
        assert (await js.stream_info("WRITE_LATER")).state.messages == 1
    finally:
        await pub.close()


async def test_a_closed_client_is_left_alone(nats_url: str) -> None:
    pub = await nats.connect(nats_url)
    await pub.close()
    assert not write_now(pub)
