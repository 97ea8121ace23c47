"""The gate: hold generation calls in flight until a test lets them go.

Why: a test that needs "provider calls still in flight when X happens" (a node dies, a worker
drains) must arrange that precondition, not sleep and hope the machine is slow enough. While
the gate is closed, every generation call waits right after it was received (already counted
in flight); the test closes the gate, starts its work, waits until the emulator holds the calls
it needs (:meth:`Gate.wait_held`), does X, and opens the gate: the held calls then go on as usual.
"""

from __future__ import annotations

import asyncio
import contextlib


class Gate:
    """Open (calls pass) or closed (calls wait in :meth:`passage` until it opens).

    Everything runs on the emulator's event loop, so plain counters suffice.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._held = 0
        self._watchers: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def is_open(self) -> bool:
        """Whether calls pass without waiting."""
        return self._open.is_set()

    @property
    def held(self) -> int:
        """Calls waiting at the closed gate right now."""
        return self._held

    def close(self) -> None:
        """Hold every generation call received from now on."""
        self._open.clear()

    def open(self) -> None:
        """Let the held calls go on, and every later call pass."""
        self._open.set()

    async def passage(self) -> None:
        """Returns at once while open; while closed, waits (counted in :attr:`held`) until opened.

        A call cancelled while held (its client gave up) leaves the count.
        """
        if self._open.is_set():
            return
        self._held += 1
        self._notify()
        try:
            await self._open.wait()
        finally:
            self._held -= 1

    async def wait_held(self, count: int = 1) -> None:
        """Returns once at least ``count`` calls are held at the gate (bound it with a timeout)."""
        if self._held >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = (count, future)
        self._watchers.append(watcher)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove(watcher)

    def _notify(self) -> None:
        for count, future in list(self._watchers):
            if self._held >= count and not future.done():
                future.set_result(None)
