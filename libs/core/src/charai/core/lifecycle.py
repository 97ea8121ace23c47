"""Running a long-lived component until SIGTERM/SIGINT, the same way in every service."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog

log = structlog.get_logger("lifecycle")


async def run_until_signal(component: AbstractAsyncContextManager[Any], name: str) -> None:
    """Starts ``component`` (``async with``), waits for SIGTERM or SIGINT, then lets its ``close``
    drain: no new work, in-flight work finishes or is handed back within the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with component:
        await stop.wait()
        log.info(f"{name}_draining")
