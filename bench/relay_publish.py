"""What a relay batch of jobs costs to publish: ``python -m bench.relay_publish [--rounds R]
[--batch B] [--batches N]``.

A real ``nats-server -js`` (its own process, a temporary store) with a jobs stream, and a client
in this process publishing N batches of B job-sized messages (with ``Nats-Msg-Id`` and
``traceparent`` headers, as the outbox relay sends them), alternating round by round:

- ``js.publish`` per job, the batch gathered (the relay before 2c3daad: a task, a request
  future and a ``wait_for`` timer per job);
- :class:`charai.core.natsconn.AckedPublisher` (the relay now): the batch's messages queued
  back to back, their PubAcks awaited together under one timeout.

Prints CPU per job of the client (this process) and of nats-server (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench.grpc_transport import _cpu
from bench.media_put import connect, cpu_per, on_server

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _run(port: int, server: int, rounds: int, batch: int, batches: int) -> None:
    from charai.core.natsconn import AckedPublisher

    nc = await connect(port)
    js = nc.jetstream()
    await js.add_stream(name="BENCH_JOBS", subjects=["bench.jobs.>"])
    publisher = AckedPublisher(nc)
    payload = os.urandom(120)  # about a Job message
    sent = 0

    def headers(i: int) -> dict[str, str]:
        return {"Nats-Msg-Id": f"task_{i:032x}:1", "traceparent": TRACEPARENT}

    async def gathered(first: int) -> None:
        async def one(i: int) -> Any:
            return await js.publish("bench.jobs.tts.normal", payload, timeout=5.0, headers=headers(i))

        await asyncio.gather(*(one(first + i) for i in range(batch)))

    async def acked(first: int) -> None:
        acks = [
            await publisher.publish("bench.jobs.tts.normal", payload, headers(first + i))
            for i in range(batch)
        ]
        async with asyncio.timeout(5.0):
            await asyncio.gather(*acks)

    for kind in (acked, gathered):  # warm-up
        for _ in range(20):
            await kind(sent)
            sent += batch
    for r in range(rounds):
        for label, kind in (("js.publish, gathered", gathered), ("AckedPublisher     ", acked)):
            s0, c0 = _cpu(server), time.process_time()
            for _ in range(batches):
                await kind(sent)
                sent += batch
            print(f"round {r + 1}, {label}: {cpu_per(batch * batches, c0, s0, server)} per job", flush=True)
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_publish", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="jobs per batch")
    parser.add_argument("--batches", type=int, default=100, help="batches per round and kind")
    args = parser.parse_args()
    on_server(lambda port, pid: _run(port, pid, args.rounds, args.batch, args.batches))


if __name__ == "__main__":
    main()
