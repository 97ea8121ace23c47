"""``python -m charai.devstack run|demo``"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from charai.devstack.stack import Stack


async def run(data_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Stack(data_dir, free_ports=False, echo=sys.stdout) as stack:
        print(
            f"\ncharai is running: gRPC {stack.gateway_grpc}, HTTP {stack.gateway_http}"
            f", NATS {stack.nats_url}"
            + (f", emulator {stack.emulator_url}" if stack.emulator_url else "")
            + "\nCtrl-C stops it.\n",
            flush=True,
        )
        waiter = asyncio.create_task(stop.wait())
        watch = [asyncio.create_task(p.process.wait()) for p in stack.procs.values()]
        done, _ = await asyncio.wait([waiter, *watch], return_when=asyncio.FIRST_COMPLETED)
        for task in [waiter, *watch]:
            task.cancel()
        if waiter not in done:
            print("a service exited; stopping the stack", file=sys.stderr)
            return 1
        print("\nstopping...", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m charai.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the whole stack in the foreground")
    demo = sub.add_parser("demo", help="start the stack, generate one image and one voice, stop")
    demo.add_argument("--out", default="demo-output", help="where to save the media files")
    demo.add_argument("--verbose", action="store_true", help="also print the services' log lines")
    args = parser.parse_args()
    import os

    data_dir = Path(os.environ.get("CHARAI_DATA_DIR", ".data"))
    if args.command == "run":
        sys.exit(asyncio.run(run(data_dir)))
    from charai.devstack.demo import demo as run_demo

    sys.exit(asyncio.run(run_demo(Path(args.out), verbose=args.verbose)))


if __name__ == "__main__":
    main()
