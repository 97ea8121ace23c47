"""``python -m charai.emulator``: run the emulator as a standalone process.

Prints exactly one JSON line on stdout once listening, e.g.
``{"event":"emulator_listening","url":"http://127.0.0.1:PORT","api_base":".../api/paas/v4",
"openai_base":".../v1","dialects":["zhipu"]}`` so a supervisor started with ``--port 0`` learns
the port without races. Everything else (logs) goes to stderr. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from charai.emulator.config import EmulatorConfig
from charai.emulator.dialects import DIALECTS, parse_dialects
from charai.emulator.runner import running_emulator

ADDR_ENV = "CHARAI_EMULATOR_ADDR"
API_KEY_ENV = "CHARAI_EMULATOR_API_KEY"
DIALECT_ENV = "CHARAI_EMULATOR_DIALECT"


def _dialects(text: str) -> frozenset[str]:
    """``--dialect zhipu,openai`` -> the set, or a usage error naming the bad one."""
    try:
        return parse_dialects(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _latency(text: str) -> tuple[float, float]:
    """Parse ``MIN:MAX`` or a single ``SECONDS`` into a range."""
    low, sep, high = text.partition(":")
    try:
        lo = float(low)
        hi = float(high) if sep else lo
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"latency must be SECONDS or MIN:MAX, got {text!r}") from exc
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"latency range must be 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) from ``CHARAI_EMULATOR_ADDR``."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"{ADDR_ENV} must be host:port, got {addr!r}")
    return host.strip("[]"), int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; explicit flags win over ``CHARAI_EMULATOR_ADDR``."""
    env_host, env_port = "127.0.0.1", 0
    if os.environ.get(ADDR_ENV):
        env_host, env_port = _split_addr(os.environ[ADDR_ENV])
    parser = argparse.ArgumentParser(
        prog="python -m charai.emulator", description="Local Zhipu v4 / OpenAI API emulator."
    )
    parser.add_argument("--host", default=env_host, help="interface to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=env_port, help="TCP port, 0 = any free port")
    parser.add_argument(
        "--latency", type=_latency, default=(0.2, 0.6), help="SECONDS or MIN:MAX (default 0.2:0.6)"
    )
    parser.add_argument("--async-poll-steps", type=int, default=3)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this Bearer key (or set {API_KEY_ENV}); never logged",
    )
    parser.add_argument(
        "--dialect",
        type=_dialects,
        default=os.environ.get(DIALECT_ENV) or "zhipu",
        help=f"comma-separated APIs to serve, from {','.join(DIALECTS)} (default zhipu, or {DIALECT_ENV})",
    )
    parser.add_argument("--call-log-size", type=int, default=2000, help="calls kept in the stats log")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public-url", default=None, help="base URL used in returned file links")
    parser.add_argument("--access-log", action="store_true", help="log each request to stderr")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Start, announce the address on stdout, and wait for SIGTERM/SIGINT."""
    lo, hi = args.latency
    config = EmulatorConfig(
        latency_min=lo,
        latency_max=hi,
        async_poll_steps=args.async_poll_steps,
        api_key=args.api_key or None,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        public_url=args.public_url,
        dialects=args.dialect,
        call_log_size=args.call_log_size,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_emulator(config, args.host, args.port, access_log=args.access_log) as emu:
        line = {
            "event": "emulator_listening",
            "url": emu.url,
            "api_base": emu.api_base,
            "openai_base": emu.openai_base,
            "dialects": sorted(config.dialects),
        }
        sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        logging.getLogger("charai.emulator").info(
            "emulator listening on %s (dialects %s, auth %s, max_concurrency %s)",
            emu.url,
            ",".join(sorted(config.dialects)),
            "on" if config.api_key else "off",
            config.max_concurrency,
        )
        await stop.wait()
    logging.getLogger("charai.emulator").info("emulator stopped")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
