"""What a media read costs: ``python -m bench.media_get [--reads R] [--sizes BYTES,...]``.

A real ``nats-server -js`` (its own process, a temporary store) and a client in this process: an
object of each size is put once, then read R times by nats-py's ``ObjectStore.get`` and R times
by charai's :meth:`charai.core.media.MediaStore.get` (what the gateway's downloads use: chunks
read into one buffer, each awaited at most ``chunk_wait``). Prints the mean wall time per read.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.media_put import connect, jetstream_server

BUCKET = "media_get_bench"


async def _run(port: int, reads: int, sizes: list[int]) -> None:
    from charai.core.media import MediaStore
    from nats.js import api

    nc = await connect(port)
    js = nc.jetstream()
    bucket = await js.create_object_store(BUCKET, config=api.ObjectStoreConfig(bucket=BUCKET))
    media = MediaStore(bucket, js, BUCKET)
    for size in sizes:
        data = os.urandom(size)
        key = f"object-{size}"
        await media.put(key, data, new=True)
        timings = {}
        for label, read in (("nats-py get", bucket.get), ("MediaStore.get", media.get)):
            t0 = time.perf_counter()
            for _ in range(reads):
                got = await read(key)
                assert (got if isinstance(got, bytes) else got.data) == data
            timings[label] = (time.perf_counter() - t0) / reads * 1000
        print(f"{size:>11,} bytes: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()), flush=True)
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.media_get", description=__doc__)
    parser.add_argument("--reads", type=int, default=20, help="reads per size and kind")
    parser.add_argument("--sizes", default="20000,2097152,8388608,33554432", help="bytes, comma-separated")
    args = parser.parse_args()
    import uvloop

    with jetstream_server() as (port, _):
        uvloop.run(_run(port, args.reads, [int(s) for s in args.sizes.split(",")]))


if __name__ == "__main__":
    main()
