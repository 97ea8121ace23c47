"""``python -m charai.devstack run|demo``"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from charai.devstack.stack import ALL_SERVICES, Stack
from charai.devstack.supervisor import CrashLoopError, Supervisor


async def run(data_dir: Path) -> int:
    """``make run``: the stack in the foreground, supervised (a process that dies is restarted),
    until Ctrl-C / SIGTERM (0) or until a process keeps crashing at start (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(data_dir, free_ports=False, echo=sys.stdout, services=ALL_SERVICES)
    async with Supervisor(stack) as supervisor:
        starting = asyncio.create_task(supervisor.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():  # Ctrl-C while starting
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            print("\nstopping...", flush=True)
            return 0
        try:
            starting.result()
        except CrashLoopError as exc:
            supervisor.report(exc)
            return 1
        stack = supervisor.stack
        processes = len(stack.gateway_processes())
        print(
            f"\ncharai is running: gRPC {stack.gateway_grpc}, HTTP {stack.gateway_http}"
            + (f" ({processes} gateway processes)" if processes else "")
            + f", NATS {stack.nats_url}"
            + (f", emulator {stack.emulator_url}" if stack.emulator_url else "")
            + "\nA service that dies is restarted; Ctrl-C stops them all.\n",
            flush=True,
        )
        code = await supervisor.run(stop)
        if code == 0:
            print("\nstopping...", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m charai.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the whole stack in the foreground, restarting a service that dies")
    demo = sub.add_parser("demo", help="start the stack, generate one image and one voice, stop")
    demo.add_argument("--out", default="demo-output", help="where to save the media files")
    demo.add_argument("--verbose", action="store_true", help="also print the services' log lines")
    args = parser.parse_args()

    data_dir = Path(os.environ.get("CHARAI_DATA_DIR", ".data"))
    if args.command == "run":
        sys.exit(asyncio.run(run(data_dir)))
    from charai.devstack.demo import demo as run_demo

    sys.exit(asyncio.run(run_demo(Path(args.out), verbose=args.verbose)))


if __name__ == "__main__":
    main()
