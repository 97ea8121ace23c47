"""End-to-end fixtures: the processes that ``make run`` starts (devstack), on free ports, with
short timers so retries and faults are fast. One stack per test module."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import SERVICES, Stack

FAST_SETTINGS = {
    "CHARAI_RETRY_BASE_SECONDS": "0.2",
    "CHARAI_RETRY_CAP_SECONDS": "1.0",
    "CHARAI_ACK_WAIT_SECONDS": "5",
    "CHARAI_LEASE_SECONDS": "5",
    # Long enough that a loaded CI machine never turns a slow success into a timeout retry;
    # tests of the timeout row (test_errors.py) start a stack with 3 s instead.
    "CHARAI_IMAGE_TIMEOUT_SECONDS": "20",
    "CHARAI_TTS_TIMEOUT_SECONDS": "20",
    "CHARAI_IMAGE_POLL_SECONDS": "0.1",
    "CHARAI_WATCH_HEARTBEAT_SECONDS": "1",
    "CHARAI_LOG_LEVEL": "info",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)


@contextlib.asynccontextmanager
async def fast_stack(
    tmp_path_factory: pytest.TempPathFactory,
    services: tuple[str, ...] = SERVICES,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
    env: Mapping[str, str] | None = None,
    **extra_env: str,
) -> AsyncIterator[Stack]:
    """The devstack with FAST_SETTINGS (plus ``env`` and ``extra_env``) on free ports; only
    ``services`` (the webhook sender only when a test asks), each with its ``service_env``."""
    data = tmp_path_factory.mktemp("stack")
    env = {**FAST_SETTINGS, **(env or {}), **extra_env}
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    async with Stack(
        Path(data),
        env,
        free_ports=True,
        echo=echo,
        emulator_args=["--latency", "0.05:0.15", "--async-poll-steps", "2"],
        services=services,
        service_env=service_env,
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with fast_stack(tmp_path_factory) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(stack: Stack) -> AsyncIterator[CharaiClient]:
    async with CharaiClient(stack.gateway_grpc) as c:
        yield c
