"""A lone command's cost on each transport: ``python -m bench.exchange_transport [--rounds R]``.

A real task_store (and gateway, for the creates) from the devstack; 10 running tasks; then, per
round and per transport, 300 progress reports one at a time (each alone in its call, as a
watched task's progress is at low load) from a coalescing ``StoreClient`` with ``stream=False``
(unary ``Exchange`` calls) and ``stream=True`` (messages of one ``ExchangeStream`` call),
alternated. Prints task_store's CPU per report (from /proc), this client's, and the round trip.
"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: the services' gRPC transport, as in bench

# isort: split
import argparse
import asyncio
import time

from charai.client import CharaiClient
from charai.core.storeclient import StoreClient

from bench import ours
from bench.common import cpu_seconds

REPORTS = 300


async def main(rounds: int) -> None:
    async with (
        ours.stack(env=ours.B5_ENV, services=("task_store", "gateway")) as s,
        CharaiClient(s.gateway_grpc) as client,
    ):
        ids = [(await client.create(ours.tts_request(f"hop-{k}", f"hop {k}"))).id for k in range(10)]
        token = s.env.get("CHARAI_INTERNAL_TOKEN", "")
        async with StoreClient(s.task_store_addr, token, coalesce=True) as claimer:
            await asyncio.gather(*(claimer.claim_task(t, 1, "bench") for t in ids))
        store_pid = ours.pid(s, "task_store")
        progress = 11
        for r in range(rounds):
            for stream in (False, True):
                async with StoreClient(s.task_store_addr, token, coalesce=True, stream=stream) as store:
                    await store.report_progress(ids[0], 1, progress, "generating")  # connected
                    c0, b0, w0 = cpu_seconds(store_pid), time.process_time(), time.perf_counter()
                    for i in range(REPORTS):
                        progress = min(progress + 1, 89)
                        await store.report_progress(ids[i % len(ids)], 1, progress, "generating")
                    wall = time.perf_counter() - w0
                    print(
                        f"round {r + 1}, {'ExchangeStream' if stream else 'unary Exchange'}:"
                        f" task_store {(cpu_seconds(store_pid) - c0) / REPORTS * 1e3:.3f} CPU-ms,"
                        f" client {(time.process_time() - b0) / REPORTS * 1e3:.3f} CPU-ms,"
                        f" {wall / REPORTS * 1e3:.2f} ms per report",
                        flush=True,
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.exchange_transport", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args().rounds))
