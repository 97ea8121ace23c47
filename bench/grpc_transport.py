"""What gRPC's transport setting costs per call: ``python -m bench.grpc_transport [--rounds R]``.

A bare ``grpc.aio`` echo server (its own process, uvloop, as charai's services run) and a client
in this process, over loopback: sequential unary calls, unary calls 100 in flight, and sequential
messages on one bidi stream (what a store ``Exchange`` is). Server CPU from /proc, client CPU from
this process, per call. Alternates gRPC's defaults (``GRPC_EXPERIMENTS=``) with charai's setting
(:data:`charai.core.grpcenv.DEFAULT`) round by round; each setting reaches both sides (this
process runs each round's client in a child of its own, since gRPC reads the variable at import).

Each one-at-a-time figure also gives its round trip's p50, beside the same through a bare asyncio
TCP echo of that server process (no gRPC: the floor of a loopback round trip between two event
loops). ``--idle-ms G``: G ms of sleep before each of those round trips, as a call on an idle
service is (a hop's cost at low load, B1's, is mostly wake-ups; hot, the same calls cost less).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

SERVER = """
import asyncio, sys, grpc, uvloop
async def main(port):
    server = grpc.aio.server()
    async def unary(request, context):
        return request
    async def bidi(requests, context):
        async for message in requests:
            yield message
    handler = grpc.method_handlers_generic_handler("e.E", {
        "U": grpc.unary_unary_rpc_method_handler(unary),
        "B": grpc.stream_stream_rpc_method_handler(bidi)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)
    await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", int(sys.argv[2]))
    print("ready", flush=True)
    await server.wait_for_termination()
uvloop.run(main(sys.argv[1]))
"""

PAYLOAD = b"x" * 100


def _cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _p50(times: list[float]) -> str:
    return f", round trip p50 {sorted(times)[len(times) // 2] * 1000:.3f} ms" if times else ""


async def _client(port: int, tcp_port: int, server: int, n: int, idle: float) -> None:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary("/e.E/U")
        bidi = channel.stream_stream("/e.E/B")
        for _ in range(200):
            await unary(PAYLOAD)
        figures = []
        trips: list[float] = []  # the figure's round trips, one at a time

        async def measure(name: str, calls: int, body: object) -> None:
            trips.clear()
            s0, c0, t0 = _cpu(server), time.process_time(), time.perf_counter()
            await body  # type: ignore[misc]
            wall = time.perf_counter() - t0
            figures.append(
                f"{name}: server {(_cpu(server) - s0) / calls * 1e6:.0f} CPU-us,"
                f" client {(time.process_time() - c0) / calls * 1e6:.0f} CPU-us,"
                f" {calls / wall:,.0f} calls/s{_p50(trips)}"
            )

        async def timed(trip: Callable[[], Awaitable[object]]) -> None:
            """One round trip, begun after the idle wait (a gRPC call starts when it is made)."""
            if idle:
                await asyncio.sleep(idle)
            start = time.perf_counter()
            await trip()
            trips.append(time.perf_counter() - start)

        async def sequential() -> None:
            for _ in range(n):
                await timed(lambda: unary(PAYLOAD))

        async def lanes() -> None:
            async def lane() -> None:
                for _ in range(n // 100):
                    await unary(PAYLOAD)

            await asyncio.gather(*(lane() for _ in range(100)))

        async def stream() -> None:
            call = bidi()

            async def trip() -> None:
                await call.write(PAYLOAD)
                await call.read()

            for _ in range(n):
                await timed(trip)
            await call.done_writing()

        async def tcp() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)

            async def trip() -> None:
                writer.write(PAYLOAD)
                await reader.readexactly(len(PAYLOAD))

            for _ in range(n):
                await timed(trip)
            writer.close()
            await writer.wait_closed()

        await measure("unary, one at a time", n, sequential())
        await measure("unary, 100 in flight", n // 100 * 100, lanes())
        await measure("bidi messages, one at a time", n, stream())
        await measure("bare TCP echo, one at a time", n, tcp())
        print(" | ".join(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_transport", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=3000, help="calls per figure")
    parser.add_argument(
        "--idle-ms", type=float, default=0.0, help="sleep before each one-at-a-time round trip (ms)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        port, tcp_port = _free_port(), _free_port()
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port), str(tcp_port)], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        try:
            server.stdout.readline()
            uvloop.run(_client(port, tcp_port, server.pid, args.n, args.idle_ms / 1000))
        finally:
            server.kill()
            server.wait()
        return
    from charai.core.grpcenv import DEFAULT

    for r in range(args.rounds):
        for label, value in (("gRPC defaults", ""), (f"charai ({DEFAULT})", DEFAULT)):
            env = {**os.environ, "GRPC_EXPERIMENTS": value}
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.grpc_transport",
                    "--child",
                    "--n",
                    str(args.n),
                    "--idle-ms",
                    str(args.idle_ms),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            print(f"round {r + 1}, {label}: {out}", flush=True)


if __name__ == "__main__":
    main()
