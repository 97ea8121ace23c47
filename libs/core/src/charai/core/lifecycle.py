"""Running a long-lived component until SIGTERM/SIGINT, the same way in every service."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, get_args

import structlog
from charai.core.settings import EventLoop

log = structlog.get_logger("lifecycle")
T = TypeVar("T")
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoop)


def run(main: Coroutine[Any, Any, T], event_loop: EventLoop = "uvloop") -> T:
    """``asyncio.run`` on the event loop the settings name (``CHARAI_EVENT_LOOP``, checked there):
    ``uvloop`` (libuv, the default: less CPU per socket wake-up, which every hop of a task pays)
    or ``asyncio`` (the standard loop, to rule uvloop out when chasing a bug)."""
    if event_loop not in EVENT_LOOPS:
        main.close()
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}")
    if event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


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
