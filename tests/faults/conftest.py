"""Fault-injection fixtures: a fresh devstack (the processes ``make run`` starts) per test, with
timers short enough that a lost job is redelivered within seconds.

Why a fresh stack per test: a fault leaves traces (a killed worker's orphan chunks, restarted
NATS, emulator counters, event sequences), and the invariants are checked over the whole stack
(every job in the stream settled, every object in the bucket accounted for). A stack starts in
about three seconds, so isolation is cheap.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import SERVICES, Stack

#: Short timers: JetStream redelivers an unacknowledged job after 2 s, a silent attempt loses
#: its lease after 3 s, retries start at 0.1 s. The retry cap stays above the emulator's
#: Retry-After (1 s) so the jitter on top of it is not clipped away.
FAULT_SETTINGS: dict[str, str] = {
    "CHARAI_ACK_WAIT_SECONDS": "2",
    "CHARAI_LEASE_SECONDS": "3",
    "CHARAI_RETRY_BASE_SECONDS": "0.1",
    "CHARAI_RETRY_CAP_SECONDS": "3",
    "CHARAI_IMAGE_TIMEOUT_SECONDS": "10",
    "CHARAI_TTS_TIMEOUT_SECONDS": "10",
    "CHARAI_IMAGE_POLL_SECONDS": "0.1",
    "CHARAI_WATCH_HEARTBEAT_SECONDS": "1",
    "CHARAI_SHUTDOWN_GRACE_SECONDS": "3",
    "CHARAI_REDISPATCH_AFTER_SECONDS": "5",
    "CHARAI_SWEEP_INTERVAL_SECONDS": "1",
    "CHARAI_LOG_LEVEL": "info",
    # The fault tests submit hundreds of tasks at once and resend them during outages; the
    # per-tenant submission limit is tested elsewhere and would only add RESOURCE_EXHAUSTED here.
    "CHARAI_SUBMIT_RATE_PER_TENANT": "0",
}
EMULATOR_ARGS = ["--latency", "0.05:0.15", "--async-poll-steps", "1"]
GRACE = float(FAULT_SETTINGS["CHARAI_SHUTDOWN_GRACE_SECONDS"])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: kills, stops or restarts the real processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


StackFactory = Callable[..., contextlib.AbstractAsyncContextManager[Stack]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


def dump_logs(stacks: list[Stack]) -> None:
    """On failure: every warning and error of every process the test started (dead ones too)
    and the last lines of each, so a failure in CI can be read without re-running it; the full
    logs go to files in the stack's data directory."""
    for number, stack in enumerate(stacks):
        for proc in stack.history:
            path = stack.data_dir / f"{proc.name}-{proc.process.pid}.log"
            path.write_text("\n".join(proc.raw) + "\n")
            notable = [
                raw
                for raw in proc.raw
                if '"level": "warning"' in raw or '"level": "error"' in raw or "Traceback" in raw
            ]
            sys.stderr.write(f"--- stack {number} {proc.name} exit {proc.process.returncode}: {path}\n")
            for raw in [*notable[-40:], "...", *proc.raw[-10:]]:
                sys.stderr.write(f"    {raw[:400]}\n")


@pytest_asyncio.fixture
async def make_stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """``async with make_stack(env={...}, service_env={...}) as stack:`` — a stack with
    FAULT_SETTINGS (``env`` wins) that is stopped when the block or the test ends."""
    stacks: list[Stack] = []

    @contextlib.asynccontextmanager
    async def factory(
        env: Mapping[str, str] | None = None,
        *,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        emulator_args: list[str] | None = None,
        services: tuple[str, ...] = SERVICES,
    ) -> AsyncIterator[Stack]:
        echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
        stack = Stack(
            tmp_path / f"stack{len(stacks)}",
            {**FAULT_SETTINGS, **(env or {})},
            free_ports=True,
            echo=echo,
            emulator_args=emulator_args if emulator_args is not None else EMULATOR_ARGS,
            service_env=service_env,
            services=services,
        )
        stacks.append(stack)
        async with stack:
            yield stack

    yield factory
    for stack in stacks:
        await stack.close()
    if request.node.stash.get(FAILED, False):
        dump_logs(stacks)


@pytest_asyncio.fixture
async def stack(make_stack: StackFactory) -> AsyncIterator[Stack]:
    async with make_stack() as running:
        yield running


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[CharaiClient]:
    async with CharaiClient(stack.gateway_grpc) as c:
        yield c
