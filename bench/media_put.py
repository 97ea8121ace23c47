"""What a media put costs: ``python -m bench.media_put [--rounds R] [--n N] [--size BYTES]``.

A real ``nats-server -js`` (its own process, a temporary store) and a client in this process:
N objects of ``--size`` random bytes put one after another into an object-store bucket, as a
worker stores a result, alternating nats-py's ``ObjectStore.put`` with charai's put of a new
object (:meth:`charai.core.media.MediaStore.put` with ``new=True``: two publishes, no lookup)
round by round. Prints CPU per put of the client (this process) and of nats-server (/proc), and
wall time per put.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from bench.grpc_transport import _cpu, _free_port

BUCKET = "media_bench"


async def connect(port: int) -> Any:
    """A client connection to the server of :func:`jetstream_server` once it listens."""
    import nats

    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        await asyncio.sleep(0.05)
    return await nats.connect(f"nats://127.0.0.1:{port}")


@contextlib.contextmanager
def jetstream_server() -> Iterator[tuple[int, int]]:
    """A ``nats-server -js`` of its own on a free port with a temporary store: (port, pid)."""
    from charai.devstack.stack import nats_server_binary

    port = _free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", data_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield port, server.pid
        finally:
            server.kill()
            server.wait()


def cpu_per(n: int, client_since: float, server_since: float, server: int) -> str:
    """CPU-µs per unit of this process and of nats-server (pid ``server``) since the two readings
    (``time.process_time()`` and ``_cpu(server)``), over ``n`` units."""
    client = (time.process_time() - client_since) / n * 1e6
    return f"client {client:.0f} CPU-us, nats-server {(_cpu(server) - server_since) / n * 1e6:.0f} CPU-us"


def on_server(run: Callable[[int, int], Coroutine[Any, Any, None]]) -> None:
    """``run(port, pid)`` on uvloop against a :func:`jetstream_server` of its own."""
    import uvloop

    with jetstream_server() as (port, pid):
        uvloop.run(run(port, pid))


async def _run(port: int, server: int, rounds: int, n: int, size: int) -> None:
    from charai.core.media import MediaStore
    from nats.js import api

    nc = await connect(port)
    js = nc.jetstream()
    config = api.ObjectStoreConfig(bucket=BUCKET, storage=api.StorageType.FILE)
    bucket = await js.create_object_store(BUCKET, config=config)
    media = MediaStore(bucket, js, BUCKET)
    data = os.urandom(size)
    for i in range(50):  # warm-up
        await media.put(f"warm-{i}", data, new=bool(i % 2))
    for r in range(rounds):
        for label, new in (("nats-py put", False), ("new object ", True)):
            s0, c0, t0 = _cpu(server), time.process_time(), time.perf_counter()
            for i in range(n):
                await media.put(f"r{r}-{int(new)}-{i}", data, new=new)
            wall = time.perf_counter() - t0
            print(
                f"round {r + 1}, {label}: {cpu_per(n, c0, s0, server)}, {wall / n * 1e6:.0f} us per put",
                flush=True,
            )
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.media_put", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000, help="puts per round and kind")
    parser.add_argument("--size", type=int, default=20_000, help="bytes per object")
    args = parser.parse_args()
    on_server(lambda port, pid: _run(port, pid, args.rounds, args.n, args.size))


if __name__ == "__main__":
    main()
