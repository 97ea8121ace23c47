"""The gateway as two processes on one pair of ports (``CHARAI_GATEWAY_PROCESSES=2``), through the
devstack: both processes answer new connections, a watcher on one hears a cancel made through the
other (each process fans events out from its own NATS subscription), a killed process is
replaced while the other keeps the port served, and SIGTERM to the parent drains both.

Which process answered a call is read from the logs: each call carries a W3C trace id of its
own, and the ``rpc_finished`` line with that id names its ``gateway_process``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.conftest import eventually
from tests.e2e.conftest import fast_stack

E = task_pb2
Stub = task_service_pb2_grpc.TaskServiceStub
#: Far longer than any wait here: a watcher idle this long would re-read the task's log, so an event
#: that reaches it sooner came live, through its own process's NATS subscription.
HEARTBEAT_S = "600"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # No workers: a task stays queued until the test cancels it.
    async with fast_stack(
        tmp_path_factory,
        services=("task_store", "gateway"),
        service_env={"gateway": {"CHARAI_METRICS_ADDR": "127.0.0.1:0"}},
        CHARAI_GATEWAY_PROCESSES="2",
        CHARAI_WATCH_HEARTBEAT_SECONDS=HEARTBEAT_S,
    ) as running:
        yield running


def new_channel(stack: Stack) -> grpc.aio.Channel:
    """A channel with a connection of its own (grpc otherwise shares one connection between
    channels to the same target), so the kernel picks a process for it."""
    return grpc.aio.insecure_channel(stack.gateway_grpc, options=[("grpc.use_local_subchannel_pool", 1)])


def traced() -> tuple[str, tuple[tuple[str, str]]]:
    """A fresh trace id and the call metadata that carries it."""
    trace = secrets.token_hex(16)
    return trace, (("traceparent", f"00-{trace}-{secrets.token_hex(8)}-01"),)


async def process_of(stack: Stack, trace: str) -> int:
    """The index of the gateway process whose ``rpc_finished`` line has ``trace``."""
    line = await stack.wait_for_line(
        "gateway", "rpc_finished", 30, where=lambda ln: ln.get("trace_id") == trace
    )
    return int(line["gateway_process"])


async def answered_by(stack: Stack, channel: grpc.aio.Channel) -> int:
    """Makes one call on ``channel`` (it must succeed) and says which process answered it."""
    trace, metadata = traced()
    request = task_service_pb2.ListTasksRequest(page_size=1)
    await Stub(channel).ListTasks(request, metadata=metadata, timeout=30)
    return await process_of(stack, trace)


async def processes_seen(stack: Stack, attempts: int = 200) -> set[int]:
    """The processes that answered calls over new connections, until both did (or ``attempts``)."""
    seen: set[int] = set()
    for _ in range(attempts):
        async with new_channel(stack) as channel:
            seen.add(await answered_by(stack, channel))
        if seen == {0, 1}:
            break
    return seen


async def pinned(stack: Stack, index: int) -> grpc.aio.Channel:
    """An open channel whose connection process ``index`` serves."""
    for _ in range(200):
        channel = new_channel(stack)
        if await answered_by(stack, channel) == index:
            return channel
        await channel.close()
    raise AssertionError(f"no connection reached gateway process {index}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_new_connections_are_answered_by_both_processes(stack: Stack) -> None:
    pids = stack.gateway_processes()
    assert sorted(pids) == [0, 1]
    assert len({*pids.values(), stack.pid("gateway")}) == 3  # two processes under one parent
    assert await processes_seen(stack) == {0, 1}
    # Each serves /metrics of its own on its own port (CHARAI_METRICS_ADDR port 0: a free one each).
    ports = {
        int(ln["gateway_process"]): int(ln["metrics_port"])
        for ln in stack.logs("gateway")
        if ln.get("event") == "gateway_process_listening"
    }
    assert len(set(ports.values())) == 2
    async with aiohttp.ClientSession() as http:
        for port in ports.values():
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
                assert "charai_rpc_requests_total" in text
                # Each process shows its own garbage collector's pauses.
                assert 'charai_gc_pause_seconds_count{generation="0"}' in text


async def test_a_watcher_on_one_process_hears_a_cancel_made_through_the_other(stack: Stack) -> None:
    watching, acting = await pinned(stack, 0), await pinned(stack, 1)
    try:
        created = await Stub(acting).CreateTask(
            task_service_pb2.CreateTaskRequest(
                type=E.TASK_TYPE_TTS_GENERATION,
                tts=E.TtsPayload(character_id="char_procs", text="two processes", voice_style="tongtong"),
            ),
            timeout=30,
        )
        task_id = created.task.id
        watch_trace, metadata = traced()
        call = Stub(watching).WatchTask(task_service_pb2.WatchTaskRequest(id=task_id), metadata=metadata)
        first = await asyncio.wait_for(call.read(), 30)
        assert isinstance(first, task_service_pb2.WatchTaskResponse)  # the snapshot: the stream is open
        cancel_trace, metadata = traced()
        cancel = task_service_pb2.CancelTaskRequest(id=task_id)
        await Stub(acting).CancelTask(cancel, metadata=metadata, timeout=30)
        async with asyncio.timeout(60):
            while True:
                response = await call.read()
                assert isinstance(response, task_service_pb2.WatchTaskResponse), "stream ended early"
                if response.event.type == E.TASK_EVENT_TYPE_CANCELLED:
                    break
        call.cancel()
        assert await process_of(stack, cancel_trace) == 1
        assert await process_of(stack, watch_trace) == 0
    finally:
        await watching.close()
        await acting.close()


async def test_a_killed_process_is_replaced_while_the_other_serves_the_port(stack: Stack) -> None:
    before = stack.gateway_processes()
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    died = await stack.wait_for_line(
        "gateway", "gateway_process_died", 30, where=lambda ln: ln.get("pid") == victim
    )
    assert died["process"] == 1
    # Every new connection is answered while process 1 is gone or coming back.
    for _ in range(20):
        async with new_channel(stack) as channel:
            assert await answered_by(stack, channel) in (0, 1)
    await eventually(lambda: stack.gateway_processes()[1] != victim, timeout=60)
    assert stack.running("gateway")
    assert stack.gateway_processes()[0] == before[0]
    assert await processes_seen(stack) == {0, 1}


async def test_sigterm_to_the_parent_drains_every_process(stack: Stack) -> None:
    pids = stack.gateway_processes()
    assert await stack.stop_service("gateway") == 0
    stopped = {
        ln["gateway_process"]
        for ln in stack.logs("gateway")
        if ln.get("event") == "gateway_stopped" and "gateway_process" in ln
    }
    assert stopped == {0, 1}
    await eventually(lambda: not any(alive(pid) for pid in pids.values()), timeout=30)
    # Back up on the same ports, for whatever test runs next.
    await stack.respawn("gateway")
    await stack.wait_ready("gateway", 60)
    assert sorted(stack.gateway_processes()) == [0, 1]
