"""A stateful property test: random sequences of submit / cancel / watch-with-resume / worker
crash against a real stack (task_store, gateway, a TTS worker with the real handler, the provider
emulator), checking after every step that

* every accepted task's event log has strictly increasing sequences, at most one terminal
  event, and nothing after it;
* a watch resumed from any sequence the log holds (or from 0, the snapshot) delivers exactly
  the later events, in order, each once;

and at the end of each run that every accepted task reached exactly one terminal state, and
that resuming from every sequence of its log replays exactly the rest of it.

The tasks succeed, are slow, fail once and are retried, or are rejected by the provider
(emulator markers); the worker is crashed mid-flight (see ``Charai.crash_worker``) and a new one
started, so redelivery and lease expiry are part of what is checked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import pytest_asyncio
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES, event_type_label
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import eventually
from tests.security.harness import TENANT_A, TOKEN_A, Charai, bearer, running_charai, tts_request

MARKERS = {
    "ok": "",
    "slow": "[[latency:0.6]]",
    "fails once": "[[server*1]]",
    "rejected": "[[content]]",
}
#: A watch is read until its terminal event, or until this many heartbeats in a row came with no
#: event between them (quiet measured in the gateway's own heartbeats, 0.2 s apart, so a busy
#: machine that slows the stream slows the measure of quiet with it).
QUIET_HEARTBEATS = 2
#: No message at all for this long (not even a heartbeat) is a failure, not quiet.
READ_DEADLINE = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Charai]:
    async with running_charai(
        Path(tmp_path_factory.mktemp("stateful")),
        store={"lease_seconds": 1.5, "retry_base_seconds": 0.05, "retry_cap_seconds": 0.2, "max_attempts": 4},
        gateway={"watch_heartbeat_seconds": 0.2, "submit_rate_per_tenant": 0},
        with_worker=True,
    ) as running:
        await running.start_worker()
        yield running


def describe(events: list[task_pb2.TaskEvent]) -> list[tuple[int, str]]:
    return [(e.sequence, event_type_label(e.type).upper()) for e in events]


def check_log(task_id: str, log: list[task_pb2.TaskEvent]) -> None:
    """Sequences strictly increase; at most one terminal event, and it is the last."""
    sequences = [e.sequence for e in log]
    assert sequences == sorted(set(sequences)), f"{task_id}: sequences {sequences}"
    assert all(e.task.id == task_id for e in log), f"{task_id}: an event of another task"
    terminal = [i for i, e in enumerate(log) if e.type in TERMINAL_EVENTS]
    assert len(terminal) <= 1, f"{task_id}: {len(terminal)} terminal events: {describe(log)}"
    assert not terminal or terminal[0] == len(log) - 1, f"{task_id}: events after the end: {describe(log)}"


async def watch(charai: Charai, task_id: str, after: int) -> tuple[list[task_pb2.TaskEvent], bool]:
    """The events a WatchTask from ``after`` delivers (heartbeats dropped), and whether the stream
    ended by itself (rather than going quiet while the task still runs)."""
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    call = stub.WatchTask(
        task_service_pb2.WatchTaskRequest(id=task_id, after_sequence=after), metadata=bearer(TOKEN_A)
    )
    events: list[task_pb2.TaskEvent] = []
    heartbeats = 0
    try:
        while heartbeats < QUIET_HEARTBEATS:
            async with asyncio.timeout(READ_DEADLINE):
                response = await call.read()
            if response is grpc.aio.EOF:
                assert await call.code() == grpc.StatusCode.OK, await call.details()
                return events, True
            assert isinstance(response, task_service_pb2.WatchTaskResponse)
            if response.event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                heartbeats += 1
            else:
                heartbeats = 0
                events.append(response.event)
        return events, False
    finally:
        call.cancel()


async def check_resume(charai: Charai, task_id: str, after: int) -> None:
    """Watching from ``after`` gives exactly the log's later events (from 0: a snapshot at the
    log's head, then exactly the events after it)."""
    got, ended = await watch(charai, task_id, after)
    log = await charai.store_events(TENANT_A, task_id)
    check_log(task_id, log)
    floor = after
    if after == 0:
        assert got and got[0].type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT, describe(got)
        floor = got[0].sequence
        assert floor in {0, *(e.sequence for e in log)}, (floor, describe(log))
        got = got[1:]
    last = got[-1].sequence if got else floor
    expected = [e for e in log if floor < e.sequence <= last]
    assert describe(got) == describe(expected), (
        f"{task_id} from {after}: got {describe(got)}, log {describe(log)}"
    )
    if ended and log and log[-1].type in TERMINAL_EVENTS and log[-1].sequence > floor:
        assert got and got[-1].type in TERMINAL_EVENTS, f"{task_id}: ended before the terminal event"


# (gRPC calls are made inside coroutines: a call object must be created on the loop's thread.)
async def create(charai: Charai, text: str) -> task_service_pb2.CreateTaskResponse:
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    return await stub.CreateTask(tts_request("char_state", text), metadata=bearer(TOKEN_A))


async def cancel(charai: Charai, task_id: str) -> task_service_pb2.CancelTaskResponse:
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    return await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task_id), metadata=bearer(TOKEN_A))


class TaskMachine(RuleBasedStateMachine):
    charai: ClassVar[Charai]
    #: Runs a coroutine on the test's loop (set by the test, as a staticmethod: no ``self``).
    run: ClassVar[staticmethod[[Coroutine[Any, Any, Any]], Any]]
    runs: ClassVar[dict[str, int]] = {"crashes": 0, "watches": 0, "tasks": 0, "cancels": 0, "retried": 0}

    accepted = Bundle("accepted")

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[str] = []
        self.crashes = 0

    @rule(target=accepted, kind=st.sampled_from(list(MARKERS)))
    def submit(self, kind: str) -> str:
        text = f"{kind} {uuid.uuid4().hex[:10]} {MARKERS[kind]}".strip()
        response = self.run(create(self.charai, text))
        self.tasks.append(response.task.id)
        self.runs["tasks"] += 1
        return str(response.task.id)

    @rule(task_id=accepted)
    def cancel(self, task_id: str) -> None:
        self.runs["cancels"] += 1
        try:
            response = self.run(cancel(self.charai, task_id))
        except grpc.aio.AioRpcError as exc:  # it had ended already
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            return
        assert response.task.status in {*TERMINAL_STATUSES, task_pb2.TASK_STATUS_RUNNING}

    @rule(task_id=accepted, data=st.data())
    def watch_with_resume(self, task_id: str, data: st.DataObject) -> None:
        log = self.run(self.charai.store_events(TENANT_A, task_id))
        after = data.draw(st.sampled_from([0, *(e.sequence for e in log)]), label="after_sequence")
        self.run(check_resume(self.charai, task_id, after))
        self.runs["watches"] += 1

    @precondition(lambda self: self.crashes < 2 and bool(self.tasks))
    @rule()
    def crash_worker(self) -> None:
        self.run(self.charai.crash_worker())
        self.run(self.charai.start_worker())
        self.crashes += 1
        self.runs["crashes"] += 1

    @invariant()
    def every_log_is_well_formed(self) -> None:
        for task_id in self.tasks:
            check_log(task_id, self.run(self.charai.store_events(TENANT_A, task_id)))

    def teardown(self) -> None:
        if not self.tasks:
            return
        charai = self.charai

        async def all_ended() -> bool:
            tasks = [await charai.stored(TENANT_A, t) for t in self.tasks]
            return all(t.status in TERMINAL_STATUSES for t in tasks)

        self.run(eventually(all_ended, timeout=30, interval=0.1))
        for task_id in self.tasks:
            log = self.run(charai.store_events(TENANT_A, task_id))
            check_log(task_id, log)
            assert log[-1].type in TERMINAL_EVENTS, f"{task_id} ended without a terminal event"
            self.runs["retried"] += log[-1].task.attempt > 1
            for after in (0, *(e.sequence for e in log)):
                self.run(check_resume(charai, task_id, after))


def in_loop(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    return run


async def test_submit_cancel_watch_and_crash_keep_every_promise(charai: Charai) -> None:
    TaskMachine.charai = charai
    TaskMachine.run = staticmethod(in_loop(asyncio.get_running_loop()))
    config = settings(
        max_examples=10,
        stateful_step_count=15,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    def enough() -> bool:
        runs = TaskMachine.runs
        return runs["tasks"] >= 10 and runs["watches"] >= 5 and runs["crashes"] >= 1

    # Hypothesis picks the rules at random: a round of 10 examples once made 85 submits and 2
    # watches. Another round (new draws) runs until the scenario was exercised, at most 3.
    for _ in range(3):
        await asyncio.to_thread(run_state_machine_as_test, TaskMachine, settings=config)
        print(f"stateful runs: {TaskMachine.runs}")
        if enough():
            break
    # The runs really did what they are about.
    assert enough(), TaskMachine.runs
