"""Run the emulator in-process (tests) or as a process (``python -m charai.emulator``).

Why a context manager: integration tests want a real TCP server on a free port, torn down
reliably, with direct access to the counters without an extra HTTP round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from charai.emulator.app import API_PREFIX, OPENAI_PREFIX, build_app
from charai.emulator.config import EmulatorConfig
from charai.emulator.state import STATE_KEY, EmulatorState

#: Connections the kernel queues before the emulator accepts them (aiohttp's default is 128; the
#: kernel caps it at net.core.somaxconn). A worker of 1,000 jobs in flight opens 1,000 connections
#: at once: past the queue, a connection waits out a SYN retransmission (1 s) before it is taken.
LISTEN_BACKLOG = 4096
SHUTDOWN_TIMEOUT = 1.0
"""Seconds to let in-flight calls finish on stop before they are cancelled; short because a
``hang`` call would otherwise hold shutdown for an hour."""


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass
class RunningEmulator:
    """Handle on a started emulator: its addresses, its counters, and its gate (a test closes
    it to hold provider calls in flight, waits until they are held, then opens it).

    Attributes:
        url: Root URL, e.g. ``http://127.0.0.1:40123`` (files, healthz, stats live here).
        api_base: What a worker uses as its Zhipu base URL (``url + /api/paas/v4``).
        port: The bound TCP port.
        app: The aiohttp application.
    """

    url: str
    api_base: str
    port: int
    app: web.Application

    @property
    def openai_base(self) -> str:
        """What a worker uses as its OpenAI base URL (``url + /v1``; served with ``dialects`` openai)."""
        return self.url + OPENAI_PREFIX

    @property
    def state(self) -> EmulatorState:
        """The live state (counters, files, tasks)."""
        return self.app[STATE_KEY]

    def stats(self) -> dict[str, Any]:
        """Same JSON as ``GET /_emulator/stats``."""
        return self.state.snapshot()

    def reset(self) -> None:
        """Same as ``POST /_emulator/reset``."""
        self.state.reset()

    def close_gate(self) -> None:
        """Hold every generation call from now on (``POST /_emulator/gate {"open": false}``)."""
        self.state.gate.close()

    def open_gate(self) -> None:
        """Let the held calls go on, and later calls pass (``{"open": true}``)."""
        self.state.gate.open()

    @property
    def held(self) -> int:
        """Calls waiting at the closed gate right now."""
        return self.state.gate.held

    async def wait_held(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the closed gate holds at least ``count`` calls.

        Raises:
            TimeoutError: Fewer were held after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            await self.state.gate.wait_held(count)


@asynccontextmanager
async def running_emulator(
    config: EmulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    access_log: bool = False,
) -> AsyncIterator[RunningEmulator]:
    """Start the emulator on ``host:port`` (0 = a free port) and stop it on exit.

    Args:
        config: Behaviour; defaults to :class:`EmulatorConfig` defaults.
        host: Interface to bind.
        port: TCP port, 0 picks a free one.
        access_log: Log one line per request via ``aiohttp.access`` (no headers, so no keys).

    Yields:
        A :class:`RunningEmulator` with the URLs and counters.
    """
    app = build_app(config)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound = runner.addresses[0]
        bound_port = int(bound[1])
        url = f"http://{_url_host(host)}:{bound_port}"
        yield RunningEmulator(url=url, api_base=url + API_PREFIX, port=bound_port, app=app)
    finally:
        app[STATE_KEY].gate.open()  # calls a test left held go on, rather than wait out the shutdown
        await runner.cleanup()
