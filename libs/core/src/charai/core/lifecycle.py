"""Running a long-lived component until SIGTERM/SIGINT, the same way in every service."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import gc
import signal
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Self, TypeVar, get_args

import structlog
from charai.core import logs
from charai.core.settings import EventLoop

log = structlog.get_logger("lifecycle")
T = TypeVar("T")
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoop)


def run(main: Coroutine[Any, Any, T], event_loop: EventLoop = "uvloop", gc_threshold: int = 0) -> T:
    """``asyncio.run`` on the event loop the settings name (``CHARAI_EVENT_LOOP``, checked there):
    ``uvloop`` (libuv, the default: less CPU per socket wake-up, which every hop of a task pays)
    or ``asyncio`` (the standard loop, to rule uvloop out when chasing a bug). ``gc_threshold``:
    see :func:`settle_gc` (``CHARAI_GC_THRESHOLD``)."""
    if event_loop not in EVENT_LOOPS:
        main.close()
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}")
    settle_gc(gc_threshold)
    if event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def settle_gc(threshold: int) -> None:
    """Tunes Python's cyclic garbage collector for a long-lived service (``threshold`` > 0; 0
    leaves the interpreter's settings alone).

    What is alive now (the imported modules, protobuf descriptors, compiled code: 63,000 to 68,000
    objects in each service) lives as long as the process, so it is frozen out of every collection
    (``gc.freeze``) instead of being traversed again by each full one. A young collection then
    runs after ``threshold`` new container objects instead of the interpreter's 700: each event,
    call and message leaves short-lived containers behind, and traversing the survivors of 700 at
    a time was most of the collector's cost. Measured under ``make bench`` loads (BENCHMARKS.md,
    eighth pass): B5's gateway spent 2,096 ms of CPU in 2,101 collections (16 full ones, the
    longest 90 ms) and now 254 ms in 61 (none full, the longest 25 ms); in B2, per 11,000 tasks,
    the TTS worker 659-702 → 138-141 ms, the gateway 210-228 → 17-18, task_store 91-94 → 1.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 10, 10)


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


class ServiceApp(abc.ABC):
    """What every service's composition root shares (``GatewayApp``, ``TaskStoreApp``,
    ``WorkerApp``, ``SenderApp``): :meth:`_open` enters each part on an exit stack as it opens
    it, so a start that fails half-way closes exactly what it opened, and :meth:`close`
    (idempotent) closes the rest in reverse order of entry, then announces :attr:`stopped`."""

    #: The line announced once the app has closed (``logs.announce``; empty: none).
    stopped = ""

    def __init__(self) -> None:
        self._exit = contextlib.AsyncExitStack()
        self._closed = False

    @abc.abstractmethod
    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        """Opens the app's parts, each entered on ``stack`` as soon as it is open."""

    async def start(self) -> None:
        try:
            await self._open(self._exit)
        except BaseException:
            await self.close()  # what was opened so far, and only that
            raise

    async def close(self) -> None:
        """Stops what :meth:`start` opened, in the documented order; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._exit.aclose()
        finally:
            if self.stopped:
                logs.announce(self.stopped)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
