"""``charai.core.natsconn.write_now``: what a publish buffered goes on the socket at once, not on
nats-py's flusher's next turn of the event loop (task_store's event publisher relies on it so that
a started event does not wait behind the create's answer and push). Real nats-server.

It works on nats-py internals (the client's buffer and transport); if a nats-py release moves
them, ``write_now`` only stops helping, and the first test here fails to say so.
"""

from __future__ import annotations

import nats
from charai.core.natsconn import write_now
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.conftest import NatsServer, eventually

DEADLINE = 20.0


async def assert_stored_in_order(
    js: JetStreamContext, stream: str, subject: str, expected: list[bytes]
) -> None:
    """Waits until the stream's last message is ``expected[-1]``, then checks that the stream
    holds exactly ``expected``, in order: no message lost and none sent twice."""

    async def last_is_the_marker() -> bool:
        try:
            return (await js.get_last_msg(stream, subject)).data == expected[-1]
        except NotFoundError:
            return False

    await eventually(last_is_the_marker, DEADLINE)
    count = (await js.stream_info(stream)).state.messages
    held = [(await js.get_msg(stream, seq)).data for seq in range(1, count + 1)]
    assert held == expected, held


async def test_write_now_sends_what_publish_buffered_exactly_once(nats_url: str) -> None:
    pub = await nats.connect(nats_url)
    try:
        js = pub.jetstream()
        # A stream records what reaches the server: a core subscriber on another connection
        # missed a message now and then on a loaded machine, with or without write_now.
        await js.add_stream(name="WRITE_NOW", subjects=["write.now"])
        # publish() buffers and only wakes the flusher: nothing is written until the loop turns.
        await pub.publish("write.now", b"one")
        assert pub.pending_data_size > 0
        assert write_now(pub)
        assert pub.pending_data_size == 0  # written: the flusher's turn finds nothing left
        assert not write_now(pub)  # nothing buffered
        await pub.publish("write.now", b"two")  # a marker behind it, on the same connection
        await pub.flush()
        # The server has read both now, but a stream stores on its own turn: wait for the marker.
        # What one connection sends arrives in order, so a second copy of "one" would be before it.
        await assert_stored_in_order(js, "WRITE_NOW", "write.now", [b"one", b"two"])
    finally:
        await pub.close()


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
        await pub.publish("write.later", b"marker")
        await pub.flush()  # the replayed buffer went out before this round trip's PING
        await assert_stored_in_order(js, "WRITE_LATER", "write.later", [b"kept", b"marker"])
    finally:
        await pub.close()


async def test_a_closed_client_is_left_alone(nats_url: str) -> None:
    pub = await nats.connect(nats_url)
    await pub.close()
    assert not write_now(pub)
