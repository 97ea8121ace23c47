"""A burst of new connections waits in the kernel's queue until the server accepts it, rather than
being dropped at the door.

Past a listening socket's backlog the kernel drops a new connection's SYN, and the client tries
again only after a second (its SYN retransmission). aiohttp's default backlog is 128; a worker
of 1,000 jobs in flight opens 1,000 connections to the provider at once (bench B3's first run at
1,000 lost a second that way, peers included), and so can a crowd of browsers at the gateway.

Each test opens its connections from the event loop the server runs on, without yielding to it:
the server accepts none of them meanwhile, so every one must wait in the queue. (With a backlog
of 128, 129 connect and the rest stay unanswered however long the test waits.)
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from charai.emulator.runner import running_emulator
from charai.gateway.app import GatewayApp
from charai.task_store.app import TaskStoreApp

from tests.conftest import NatsServer
from tests.integration.test_composition import gateway_settings, store_settings

BURST = 600


def connected_in_a_burst(port: int, count: int = BURST, deadline: float = 20.0) -> int:
    """Opens ``count`` connections to ``port`` at once and waits (blocking the caller's event
    loop, so the server accepts none) until all are established or ``deadline`` seconds passed;
    returns how many were."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        pending = set(sockets)
        give_up = time.monotonic() + deadline
        while pending and time.monotonic() < give_up:
            _, writable, _ = select.select([], list(pending), [], 0.5)
            for sock in writable:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    pending.discard(sock)
        return count - len(pending)
    finally:
        for sock in sockets:
            sock.close()


async def test_the_emulator_queues_a_burst_of_connections_it_has_not_accepted_yet() -> None:
    async with running_emulator() as emu:
        assert connected_in_a_burst(emu.port) == BURST


async def test_the_gateways_http_port_queues_a_burst_of_connections_it_has_not_accepted_yet(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        TaskStoreApp(store_settings(nats_server, tmp_path), "127.0.0.1:0") as store,
        GatewayApp(gateway_settings(nats_server, tmp_path, store.port)) as gateway,
    ):
        assert connected_in_a_burst(gateway.http_port) == BURST
