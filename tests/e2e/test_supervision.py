"""``make run`` supervises: ``kill -9`` one of its processes while tasks are in flight and the
devstack restarts it on the same address; every task still completes, exactly once. A process
that keeps crashing at start stops the stack, named, with a non-zero exit.

The real entry point runs (``python -m charai.devstack run``) as a subprocess on free ports. Tasks
are in flight by construction, not by timing: the worker test's prompts make the emulator hang
their first call (``[[hang*1]]``), so no task can complete before its worker is killed; the
task_store test's calls take 10 s (``[[latency:10]]``) and task_store is killed as soon as every
task is running. Waits are on conditions, with generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import later_port

#: A whole ``make run`` starts inside the first test (module fixture), and every wait is on a
#: condition: give a loaded machine room (a deadline, not a speed claim).
pytestmark = pytest.mark.timeout(300)
INTERNAL_TOKEN = f"internal-{uuid.uuid4().hex}"
TENANT = "default"  # auth is off: every caller is this tenant
#: Short timers: a killed worker's job is redelivered after 3 s, its attempt's lease lapses after 5.
SETTINGS = {
    "CHARAI_ACK_WAIT_SECONDS": "3",
    "CHARAI_LEASE_SECONDS": "5",
    "CHARAI_RETRY_BASE_SECONDS": "0.2",
    "CHARAI_RETRY_CAP_SECONDS": "1",
    "CHARAI_IMAGE_POLL_SECONDS": "0.2",
    "CHARAI_SHUTDOWN_GRACE_SECONDS": "3",
    "CHARAI_LOG_LEVEL": "info",
    "CHARAI_INTERNAL_TOKEN": INTERNAL_TOKEN,
}
READY = re.compile(r"\[\s*devstack\] (\w+) ready \(pid (\d+)\)")


class Run:
    """``python -m charai.devstack run`` and every line it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, env: dict[str, str]) -> None:
        self.proc = proc
        self.env = env
        self.lines: list[str] = []
        self.emulator_url = ""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())
            if os.environ.get("CHARAI_TEST_ECHO"):
                sys.stderr.write(self.lines[-1] + "\n")

    def output(self, since: int = 0) -> str:
        return "\n".join(self.lines[since:])

    async def wait_for(self, pattern: str, since: int = 0, timeout: float = 120) -> re.Match[str]:
        compiled = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[since:]:
                    if match := compiled.search(line):
                        return match
                assert self.proc.returncode is None, f"make run exited:\n{self.output()[-4000:]}"
                await asyncio.sleep(0.1)

    def ready_pid(self, name: str) -> int:
        """The pid of the last ``name`` the devstack reported ready."""
        pids = [int(m[2]) for line in self.lines if (m := READY.search(line)) and m[1] == name]
        assert pids, f"{name} never reported ready"
        return pids[-1]

    async def wait_restarted(self, name: str, old_pid: int, since: int) -> int:
        """The new pid of ``name`` once the devstack reports it ready again."""
        match = await self.wait_for(rf"\[\s*devstack\] {name} ready \(pid (?!{old_pid}\)\b)(\d+)\)", since)
        new_pid = int(match[1])
        os.kill(new_pid, 0)  # it is alive
        return new_pid

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return int(self.proc.returncode or 0)


async def start_run(tmp: Path, **extra: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(
        SETTINGS,
        CHARAI_DATA_DIR=str(tmp / "data"),
        CHARAI_GATEWAY_GRPC_ADDR=f"127.0.0.1:{later_port()}",
        CHARAI_GATEWAY_HTTP_ADDR=f"127.0.0.1:{later_port()}",
        CHARAI_TASK_STORE_ADDR=f"127.0.0.1:{later_port()}",
    )
    env.update(extra)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "charai.devstack", "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    return Run(proc, env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    running = await start_run(Path(tmp_path_factory.mktemp("supervised")))
    try:
        match = await running.wait_for(r"charai is running: .*, emulator (http://\S+)")
        running.emulator_url = match[1]
        yield running
    finally:
        code = await running.stop()
        assert code == 0, running.output()[-4000:]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


async def _at_least(count: Awaitable[int], floor: int) -> bool:
    return await count >= floor


async def statuses(client: CharaiClient, ids: list[str]) -> list[int]:
    """Each task's status; -1 while the gateway cannot say (task_store restarting)."""

    async def one(task_id: str) -> int:
        try:
            return int((await client.get(task_id)).status)
        except Exception:
            return -1

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def all_running(client: CharaiClient, ids: list[str]) -> None:
    async def check() -> bool:
        found = await statuses(client, ids)
        assert task_pb2.TASK_STATUS_COMPLETED not in found, "a task completed before the kill"
        return all(s == task_pb2.TASK_STATUS_RUNNING for s in found)

    await eventually(check, 120, "every task running")


async def hung_calls(run: Run) -> int:
    """How many ``[[hang]]`` calls the emulator has received so far."""
    async with aiohttp.ClientSession() as http, http.get(f"{run.emulator_url}/_emulator/stats") as reply:
        return int((await reply.json())["modes"].get("hang", 0))


async def completed_exactly_once(run: Run, client: CharaiClient, ids: list[str]) -> list[task_pb2.Task]:
    async def done() -> bool:
        found = await statuses(client, ids)
        assert not set(found) & {task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_CANCELLED}, found
        return all(s == task_pb2.TASK_STATUS_COMPLETED for s in found)

    await eventually(done, 180, "every task completed")
    async with StoreClient(run.env["CHARAI_TASK_STORE_ADDR"], INTERNAL_TOKEN) as store:
        for task_id in ids:
            response = await store.list_events(
                spb.ListEventsRequest(tenant=TENANT, task_id=task_id, limit=500), timeout=20.0
            )
            kinds = [e.type for e in response.events]
            assert kinds.count(task_pb2.TASK_EVENT_TYPE_COMPLETED) == 1, (task_id, kinds)
            assert kinds[-1] == task_pb2.TASK_EVENT_TYPE_COMPLETED, (task_id, kinds)
    return [await client.get(i) for i in ids]


async def test_a_killed_image_worker_is_restarted_and_its_jobs_complete_once(run: Run) -> None:
    async with CharaiClient(run.env["CHARAI_GATEWAY_GRPC_ADDR"]) as client:
        marker = uuid.uuid4().hex[:8]
        hung = await hung_calls(run)
        # The first call of each prompt hangs (until the worker making it dies); later ones answer.
        tasks = [
            await client.create_image("char_sup", f"knight {marker}-{n} [[hang*1]]", resolution="1024x1024")
            for n in range(4)
        ]
        ids = [t.id for t in tasks]
        await all_running(client, ids)
        # RUNNING is written before the provider call: wait until the emulator holds all four, or
        # a call the killed worker never made would be the restarted worker's first (and hang).
        await eventually(lambda: _at_least(hung_calls(run), hung + 4), 120, "four calls hanging")
        old_pid = run.ready_pid("image_worker")
        since = len(run.lines)
        os.kill(old_pid, signal.SIGKILL)
        await run.wait_for(rf"image_worker \(pid {old_pid}\) died: killed by SIGKILL", since)
        await run.wait_for(r"restarting image_worker in \d", since)
        new_pid = await run.wait_restarted("image_worker", old_pid, since)
        assert new_pid != old_pid
        done = await completed_exactly_once(run, client, ids)
        # The hung attempt was lost with its worker; the restarted worker (the only image worker
        # left) got the redelivered job and ran the next attempt.
        assert all(t.attempt >= 2 for t in done), [t.attempt for t in done]


async def test_a_killed_task_store_is_restarted_on_its_address_and_tasks_complete_once(run: Run) -> None:
    addr = run.env["CHARAI_TASK_STORE_ADDR"]
    async with CharaiClient(run.env["CHARAI_GATEWAY_GRPC_ADDR"]) as client:
        marker = uuid.uuid4().hex[:8]
        ids = [
            (
                await client.create_image(
                    "char_sup", f"mage {marker}-{n} [[latency:10]]", resolution="1024x1024"
                )
            ).id
            for n in range(2)
        ] + [(await client.create_tts("char_sup", f"hello {marker}-{n} [[latency:10]]")).id for n in range(2)]
        await all_running(client, ids)
        old_pid = run.ready_pid("task_store")
        others = {name: run.ready_pid(name) for name in ("gateway", "image_worker", "tts_worker")}
        since = len(run.lines)
        os.kill(old_pid, signal.SIGKILL)
        await run.wait_for(rf"task_store \(pid {old_pid}\) died: killed by SIGKILL", since)
        new_pid = await run.wait_restarted("task_store", old_pid, since)
        assert new_pid != old_pid
        async with grpc.aio.insecure_channel(addr) as channel:  # the same address answers again
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=20
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await completed_exactly_once(run, client, ids)
    # Only task_store was restarted: the others kept running (and reconnected by themselves).
    assert {name: run.ready_pid(name) for name in others} == others
    died = re.findall(r"\[\s*devstack\] (\w+) \(pid (\d+)\) died", run.output(since))
    assert died == [("task_store", str(old_pid))], died


async def test_a_service_that_keeps_crashing_at_start_stops_the_stack_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the gateway's HTTP port is someone else's: it cannot start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = await start_run(tmp_path, CHARAI_GATEWAY_HTTP_ADDR=f"127.0.0.1:{port}")
        try:
            async with asyncio.timeout(240):
                code = await running.proc.wait()
        finally:
            await running.stop()
    out = running.output()
    assert code == 1, out[-4000:]
    assert "charai is running" not in out
    assert "gateway keeps crashing at start (5 times in a row, never ready)" in out, out[-4000:]
    assert f"cannot listen on 127.0.0.1:{port} (CHARAI_GATEWAY_HTTP_ADDR)" in out
    assert len(re.findall(r"gateway \(pid \d+\) crashed at start: exit code 1", out)) == 4
    # Everything it had started is stopped again.
    for var in ("CHARAI_TASK_STORE_ADDR", "CHARAI_GATEWAY_GRPC_ADDR"):
        host, _, port_text = running.env[var].rpartition(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port_text)), timeout=2).close()
