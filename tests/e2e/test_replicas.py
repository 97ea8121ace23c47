"""Replicas of every service on loopback (issue 5, item 2): one NATS, one PostgreSQL database, the
provider emulator, two task_stores sharing the database, two gateways (A talks to store 1, B to
store 2), and two workers of each kind split over the two stores.

Why a test of its own: each service is tested alone elsewhere, but the properties that make
replicas worth running only exist between processes — a watcher on gateway A hears what happened
through gateway B (events cross replicas over NATS), a cancel on B stops a provider call in a
worker that talks to store 1, and SIGKILL of any one replica loses no accepted task. The
processes are the real ones (``python -m charai.<service>``), spawned here because the devstack
runs one of each.

The tests share one module-scoped set of replicas and run in file order; the kill test comes last
because it restarts processes. What each test saw is printed (``-s`` shows it) and kept in
``REPORT`` for the session's note.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from charai.client import CharaiClient, CharaiError
from charai.devstack.stack import free_port, nats_server_binary
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.pg import PgServer, fresh_database

COMPLETED = task_pb2.TASK_STATUS_COMPLETED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
RUNNING = task_pb2.TASK_STATUS_RUNNING
EV = task_pb2.TaskEventType

# Short timers so a lost worker, a lost job or a dead relay's outbox claims are taken over in
# seconds (the values; the outbox claim is shortened for the same reason).
TIMERS = {
    "CHARAI_ACK_WAIT_SECONDS": "3",
    "CHARAI_LEASE_SECONDS": "3",
    "CHARAI_RETRY_BASE_SECONDS": "0.1",
    "CHARAI_RETRY_CAP_SECONDS": "1",
    "CHARAI_REDISPATCH_AFTER_SECONDS": "3",
    "CHARAI_SWEEP_INTERVAL_SECONDS": "1",
    "CHARAI_OUTBOX_CLAIM_SECONDS": "3",
    "CHARAI_IMAGE_POLL_SECONDS": "0.1",
    "CHARAI_IMAGE_TIMEOUT_SECONDS": "40",
    "CHARAI_TTS_TIMEOUT_SECONDS": "20",
    "CHARAI_WATCH_HEARTBEAT_SECONDS": "1",
    "CHARAI_SHUTDOWN_GRACE_SECONDS": "2",
    "CHARAI_LOG_LEVEL": "info",
    "CHARAI_LOG_FORMAT": "json",
}
REPORT: dict[str, Any] = {}


@dataclasses.dataclass
class Replica:
    """One child process: its module, its settings, and every JSON line it printed (all lives)."""

    name: str
    module: str
    env: dict[str, str]
    args: list[str] = dataclasses.field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    lines: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    raw: list[str] = dataclasses.field(default_factory=list)
    pump: asyncio.Task[None] | None = None
    starts: int = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.starts += 1
        self.pump = asyncio.create_task(self._pump(self.process))

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        echo = os.environ.get("CHARAI_TEST_ECHO")
        while raw := await process.stdout.readline():
            text = raw.decode(errors="replace").rstrip()
            self.raw.append(text)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(text))
            if echo:
                sys.stderr.write(f"[{self.name:>14}] {text}\n")

    async def wait_line(self, event: str, timeout: float, since: int = 0) -> dict[str, Any]:
        """The first line logging ``event`` among the lines from index ``since`` on."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if line.get("event") == event:
                    return line
            if not self.alive:
                raise RuntimeError(f"{self.name} exited before '{event}':\n" + "\n".join(self.raw[-20:]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log '{event}':\n" + "\n".join(self.raw[-20:]))
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self.pump is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.pump


async def wait_serving(addr: str, replica: Replica, timeout: float = 30.0) -> None:
    """gRPC health SERVING at ``addr`` (what the devstack waits for)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not replica.alive:
                raise RuntimeError(f"{replica.name} exited:\n" + "\n".join(replica.raw[-20:]))
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.name} not serving at {addr}:\n" + "\n".join(replica.raw[-20:]))
            await asyncio.sleep(0.1)


class Replicas:
    """NATS, the emulator, 2 task_stores, 2 gateways, 2 image and 2 TTS workers."""

    def __init__(self, base: Path, database_url: str) -> None:
        self.base = base
        self.database_url = database_url
        self.nats_port = free_port()
        self.nats: asyncio.subprocess.Process | None = None
        self.emulator = Replica("emulator", "charai.emulator", {}, ["--port", "0", "--latency", "0.05:0.15"])
        self.replicas: dict[str, Replica] = {}
        self.store_addr = {1: f"127.0.0.1:{free_port()}", 2: f"127.0.0.1:{free_port()}"}
        self.grpc_addr = {"A": f"127.0.0.1:{free_port()}", "B": f"127.0.0.1:{free_port()}"}
        self.http_addr = {"A": f"127.0.0.1:{free_port()}", "B": f"127.0.0.1:{free_port()}"}

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    async def start(self) -> None:
        (self.base / "nats").mkdir(parents=True, exist_ok=True)
        self.nats = await asyncio.create_subprocess_exec(
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.nats_port),
            "-sd",
            str(self.base / "nats"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await self.emulator.start()
        listening = await self.emulator.wait_line("emulator_listening", 20)
        shared = {
            **TIMERS,
            "CHARAI_NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "CHARAI_INTERNAL_TOKEN": secrets.token_urlsafe(32),
            "CHARAI_MEDIA_SIGNING_KEY": secrets.token_urlsafe(32),
            "CHARAI_IMAGE_API_BASE_URL": str(listening["api_base"]),
            "CHARAI_TTS_API_BASE_URL": str(listening["api_base"]),
            "CHARAI_PROVIDER_ALLOW_PRIVATE_URLS": "true",
        }

        def add(name: str, module: str, **env: str) -> None:
            data = self.base / name
            data.mkdir(parents=True, exist_ok=True)
            self.replicas[name] = Replica(name, module, {**shared, "CHARAI_DATA_DIR": str(data), **env})

        for n in (1, 2):
            add(
                f"task_store_{n}",
                "charai.task_store",
                CHARAI_TASK_STORE_ADDR=self.store_addr[n],
                CHARAI_DATABASE_URL=self.database_url,
            )
        both = {
            1: f"{self.store_addr[1]},{self.store_addr[2]}",
            2: f"{self.store_addr[2]},{self.store_addr[1]}",
        }
        for gw, n in (("A", 1), ("B", 2)):
            add(
                f"gateway_{gw}",
                "charai.gateway",
                # Every gateway and worker knows both replicas (round robin, failover); gateway A
                # lists store 1 first and B store 2, as a deployment behind two load balancers would.
                CHARAI_TASK_STORE_ADDR=both[n],
                CHARAI_GATEWAY_GRPC_ADDR=self.grpc_addr[gw],
                CHARAI_GATEWAY_HTTP_ADDR=self.http_addr[gw],
            )
        for kind in ("image", "tts"):
            for n in (1, 2):
                add(f"{kind}_worker_{n}", f"charai.{kind}_worker", CHARAI_TASK_STORE_ADDR=both[n])
        # Two stores at once on a fresh database: the migrations' advisory lock is exercised too.
        await asyncio.gather(*(self.restart_ready(f"task_store_{n}") for n in (1, 2)))
        # Gateways and workers together: on a small machine their start-up is mostly imports.
        await asyncio.gather(
            *(self.restart_ready(f"gateway_{g}") for g in "AB"),
            *(self.restart_ready(f"{k}_worker_{n}") for k in ("image", "tts") for n in (1, 2)),
        )

    async def restart_ready(self, name: str, timeout: float = 40.0) -> None:
        """(Re)starts ``name`` with its settings (same ports) and waits until it serves."""
        replica = self.replicas[name]
        since = len(replica.lines)
        await replica.start()
        if name.startswith("task_store"):
            await wait_serving(replica.env["CHARAI_TASK_STORE_ADDR"], replica, timeout)
            await replica.wait_line("task_store_listening", timeout, since)
        elif name.startswith("gateway"):
            await wait_serving(replica.env["CHARAI_GATEWAY_GRPC_ADDR"], replica, timeout)
            await replica.wait_line("gateway_listening", timeout, since)
        else:
            await replica.wait_line("worker_started", timeout, since)

    async def close(self) -> None:
        order = [n for n in self.replicas if n.startswith("gateway")]
        order += [n for n in self.replicas if "worker" in n]
        order += [n for n in self.replicas if n.startswith("task_store")]
        await asyncio.gather(*(self.replicas[n].stop() for n in order[:6]))
        await asyncio.gather(*(self.replicas[n].stop() for n in order[6:]))
        await self.emulator.stop()
        if self.nats is not None and self.nats.returncode is None:
            self.nats.terminate()
            await self.nats.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicas]:
    async with fresh_database(pg_server) as database:
        running = Replicas(Path(tmp_path_factory.mktemp("replicas")), database.url)
        try:
            began = time.monotonic()
            await running.start()
            REPORT["startup_seconds"] = round(time.monotonic() - began, 1)
            yield running
        finally:
            await running.close()
            if REPORT:
                print("\nreplica test report:", json.dumps(REPORT, indent=1))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(replicas: Replicas) -> AsyncIterator[dict[str, CharaiClient]]:
    async with (
        CharaiClient(replicas.grpc_addr["A"], rpc_timeout=5.0) as a,
        CharaiClient(replicas.grpc_addr["B"], rpc_timeout=5.0) as b,
    ):
        yield {"A": a, "B": b}


@contextlib.asynccontextmanager
async def raw_stub(addr: str) -> AsyncIterator[task_service_pb2_grpc.TaskServiceStub]:
    """The TaskService stub without CharaiClient's resume-and-dedupe logic, so a duplicate event
    sent by a gateway would be seen rather than silently dropped."""
    async with grpc.aio.insecure_channel(addr) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


async def task_log(addr: str, task_id: str) -> list[task_pb2.TaskEvent]:
    """The task's stored events, replayed by WatchTask from the start of the shared log (the
    task is finished, so the stream ends after the replay)."""
    async with raw_stub(addr) as stub, asyncio.timeout(15):
        call = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task_id, after_sequence=1))
        return [r.event async for r in call if r.event.type != EV.TASK_EVENT_TYPE_HEARTBEAT]


async def wait_terminal(client: CharaiClient, task_id: str, timeout: float) -> task_pb2.Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await client.get(task_id)
        if task.status in TERMINAL_STATUSES:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"{task_id} still {task_pb2.TaskStatus.Name(task.status)} after {timeout} s")
        await asyncio.sleep(0.2)


def other_gateway_url(url: str, replicas: Replicas) -> str:
    """The same signed media URL, but on the other gateway's HTTP port."""
    parts = urllib.parse.urlsplit(url)
    for gw in "AB":
        if parts.netloc == replicas.http_addr[gw]:
            other = replicas.http_addr["B" if gw == "A" else "A"]
            return urllib.parse.urlunsplit(parts._replace(netloc=other))
    raise AssertionError(f"media URL {url} names neither gateway")


def media_url(task: task_pb2.Task) -> str:
    return (
        task.image_result.image_url
        if task.type == task_pb2.TASK_TYPE_IMAGE_GENERATION
        else task.tts_result.audio_url
    )


def job_lines(replica: Replica, task_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in replica.lines
        if line.get("event") == "job_finished" and line.get("task_id") == task_id
    ]


def trace(replicas: Replicas, exc: BaseException) -> str:
    """What each replica logged about the task an error names: for a failure message that says
    where a task got stuck, not only that it did."""
    words = [w for w in str(exc).split() if w.startswith("task_")]
    if not words:
        return ""
    task_id = words[0]
    out = []
    for name, replica in replicas.replicas.items():
        for line in replica.lines:
            if line.get("task_id") == task_id:
                keep = {k: v for k, v in line.items() if k not in ("task_id", "logger", "level")}
                out.append(f"  {name}: {json.dumps(keep)}")
    return f"log lines about {task_id}:\n" + "\n".join(out[-40:])


# -- (a) submissions spread over both gateways ---------------------------------------------
async def test_submissions_spread_over_both_gateways_all_complete(
    replicas: Replicas, clients: dict[str, CharaiClient]
) -> None:
    """40 tasks (image and TTS), half through each gateway, each gateway on its own task_store:
    all complete, with media that both gateways serve (one shared signing key, one media store)."""
    began = time.monotonic()
    character = f"char_spread_{uuid.uuid4().hex[:8]}"
    created: list[tuple[str, task_pb2.Task]] = []

    async def submit(i: int) -> None:
        gw = "AB"[i % 2]
        client = clients[gw]
        if i % 4 < 2:
            task = await client.create_image(character, f"spread image {i}", resolution="1024x1024")
        else:
            task = await client.create_tts(character, f"spread voice {i}")
        created.append((gw, task))

    await asyncio.gather(*(submit(i) for i in range(40)))
    assert len({t.id for _, t in created}) == 40
    finished = await asyncio.gather(*(wait_terminal(clients[gw], t.id, 45) for gw, t in created))
    statuses = [task_pb2.TaskStatus.Name(t.status) for t in finished]
    assert statuses == ["TASK_STATUS_COMPLETED"] * 40, statuses
    # Both stores served writes and every worker replica took part or could have: count who ran.
    ran_by = {
        name: sum(1 for _, t in created if job_lines(replicas[name], t.id))
        for name in replicas.replicas
        if "worker" in name
    }
    # Each task's media URL downloads, through its own gateway and through the other one.
    for task in finished[::5]:
        url = media_url(task)
        here = await CharaiClient.download(url)
        there = await CharaiClient.download(other_gateway_url(url, replicas))
        assert here == there and len(here) > 100
    # All 40 listed once from either gateway (one database behind both stores).
    for gw in "AB":
        listed = [t.id async for t in clients[gw].list({"characterId": character})]
        assert sorted(listed) == sorted(t.id for _, t in created)
    REPORT["a_spread"] = {
        "tasks": 40,
        "via_gateway": {g: sum(1 for gw, _ in created if gw == g) for g in "AB"},
        "completed": statuses.count("TASK_STATUS_COMPLETED"),
        "jobs_finished_by_worker": ran_by,
        "seconds": round(time.monotonic() - began, 1),
    }


# -- (b) watchers on A see what happened through B ----------------------------------------
async def test_watchers_on_gateway_a_see_events_caused_through_gateway_b_exactly_once(
    replicas: Replicas, clients: dict[str, CharaiClient]
) -> None:
    """A WatchTasks stream (by characterId) and a WatchTask stream, both on gateway A, while
    every task is created (and one cancelled) through gateway B: each stored event arrives on A
    exactly once, and nothing else does."""
    character = f"char_watch_{uuid.uuid4().hex[:8]}"
    async with raw_stub(replicas.grpc_addr["A"]) as stub_a:
        # after_sequence=1: a replay from the start of the log, filtered to this new character,
        # so no event can slip between opening the stream and the first create.
        gallery = stub_a.WatchTasks(
            task_service_pb2.WatchTasksRequest(metadata={"characterId": character}, after_sequence=1)
        )
        seen: list[task_pb2.TaskEvent] = []
        ended: set[str] = set()
        ids: list[str] = []
        done = asyncio.Event()

        async def follow_gallery() -> None:
            async for response in gallery:
                event = response.event
                if event.type == EV.TASK_EVENT_TYPE_HEARTBEAT:
                    continue
                seen.append(event)
                if event.type in TERMINAL_EVENTS:
                    ended.add(event.task.id)
                if len(ids) == 7 and ended >= set(ids):
                    done.set()

        follower = asyncio.create_task(follow_gallery())
        try:
            b = clients["B"]
            first = await b.create_image(character, "watched image [[latency:1]]", resolution="1024x1024")
            ids.append(first.id)
            single: list[task_pb2.TaskEvent] = []

            async def follow_single() -> None:
                call = stub_a.WatchTask(task_service_pb2.WatchTaskRequest(id=first.id))
                async for response in call:
                    if response.event.type != EV.TASK_EVENT_TYPE_HEARTBEAT:
                        single.append(response.event)

            single_task = asyncio.create_task(follow_single())
            for i in range(4):
                ids.append((await b.create_tts(character, f"watched voice {i}")).id)
            hang = await b.create_image(character, "watched hang [[hang:30]]", resolution="1024x1024")
            ids.append(hang.id)
            ids.append((await b.create_image(character, "watched image 2", resolution="1024x1024")).id)
            await b.cancel(hang.id)
            async with asyncio.timeout(40):
                await done.wait()
                await single_task
            await asyncio.sleep(1.5)  # a late duplicate (or a straggler) would arrive now
        finally:
            follower.cancel()
            gallery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

        logs = {task_id: await task_log(replicas.grpc_addr["B"], task_id) for task_id in ids}
    stored = sorted(e.sequence for events in logs.values() for e in events)
    got = [e.sequence for e in seen]
    assert len(got) == len(set(got)), f"duplicate events on gateway A: {len(got) - len(set(got))}"
    assert sorted(got) == stored, "gateway A's WatchTasks stream differs from the stored log"
    for task_id in ids:
        per_task = [e.sequence for e in seen if e.task.id == task_id]
        assert per_task == sorted(per_task), f"{task_id}: events out of order on A"
    # WatchTask on A: the snapshot, then every later event of the task once, ending at COMPLETED.
    assert single[0].type == EV.TASK_EVENT_TYPE_SNAPSHOT
    later = [e.sequence for e in single[1:]]
    assert later == [e.sequence for e in logs[first.id] if e.sequence > single[0].sequence]
    assert single[-1].type == EV.TASK_EVENT_TYPE_COMPLETED
    final = {task_id: logs[task_id][-1].task.status for task_id in ids}
    assert final[hang.id] == CANCELLED
    assert [s for t, s in final.items() if t != hang.id] == [COMPLETED] * 6
    REPORT["b_watch"] = {
        "tasks_via_B": len(ids),
        "events_stored": len(stored),
        "events_seen_on_A_watch_tasks": len(got),
        "duplicates": len(got) - len(set(got)),
        "watch_task_events_on_A": len(single),
    }


# -- (c) cancel on B stops the job on whichever worker holds it ----------------------------
async def test_cancel_on_gateway_b_aborts_the_job_on_whichever_worker_holds_it(
    replicas: Replicas, clients: dict[str, CharaiClient]
) -> None:
    """Four image tasks that would hang the provider for 30 s, created on A and left to spread
    over both image workers (one per store); cancelled on B once running. Each ends CANCELLED in
    seconds and the worker that held it logs ``job_finished`` with outcome ``aborted``."""
    character = f"char_cancel_{uuid.uuid4().hex[:8]}"
    tasks = [
        await clients["A"].create_image(character, f"cancel me {i} [[hang:30]]", resolution="1024x1024")
        for i in range(4)
    ]

    async def running(task_id: str) -> None:
        while (await clients["B"].get(task_id)).status != RUNNING:
            await asyncio.sleep(0.1)

    async with asyncio.timeout(15):
        await asyncio.gather(*(running(t.id) for t in tasks))
    await asyncio.sleep(0.5)  # the provider call is under way
    began = time.monotonic()
    for task in tasks:
        await clients["B"].cancel(task.id)
    ended = await asyncio.gather(*(wait_terminal(clients["B"], t.id, 10) for t in tasks))
    cancel_seconds = round(time.monotonic() - began, 2)
    assert [t.status for t in ended] == [CANCELLED] * 4
    workers = ("image_worker_1", "image_worker_2")
    holders: dict[str, str] = {}
    deadline = time.monotonic() + 10
    for task in tasks:
        while True:
            lines = {w: job_lines(replicas[w], task.id) for w in workers}
            held = [w for w, found in lines.items() if found]
            if held or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(held) == 1, f"{task.id}: job_finished on {held or 'no worker'} (expected one)"
        outcomes = [line.get("outcome") for line in lines[held[0]]]
        assert outcomes == ["aborted"], f"{task.id} on {held[0]}: outcomes {outcomes}"
        holders[task.id] = held[0]
    REPORT["c_cancel"] = {
        "tasks": 4,
        "held_by": sorted(holders.values()),
        "seconds_cancel_to_all_cancelled": cancel_seconds,
        "outcomes": "aborted x4",
    }


# -- (d) kill any one replica: nothing is lost ---------------------------------------------
async def submit_with_failover(
    clients: Mapping[str, CharaiClient], home: str, make: Any, request_id: str, stats: dict[str, int]
) -> task_pb2.Task:
    """CreateTask on ``home``; on any error, the same request (same request_id) on the other
    gateway, back and forth, as a client of a replicated service does."""
    order = [home, "B" if home == "A" else "A"]
    for attempt in range(40):
        gw = order[attempt % 2]
        try:
            return await make(clients[gw], request_id)  # type: ignore[no-any-return]
        except CharaiError:
            stats["create_retries"] += 1
            await asyncio.sleep(0.1)
    raise AssertionError(f"request {request_id} was accepted by no gateway")


async def terminal_with_failover(
    clients: Mapping[str, CharaiClient], home: str, task_id: str, deadline: float
) -> task_pb2.Task | None:
    """The task once terminal (GetTask on ``home``, on the other gateway while that one fails),
    or None at ``deadline`` (monotonic)."""
    gw = home
    while True:
        try:
            task = await clients[gw].get(task_id)
            if task.status in TERMINAL_STATUSES:
                return task
        except CharaiError:
            gw = "B" if gw == "A" else "A"
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.25)


def image_or_tts(character: str, i: int) -> Any:
    """A create call for task ``i`` of a round: even image, odd TTS, each provider call 1 s."""

    async def make(client: CharaiClient, request_id: str) -> task_pb2.Task:
        text = f"kill {i} [[latency:1]]"
        if i % 2 == 0:
            return await client.create_image(character, text, resolution="1024x1024", request_id=request_id)
        return await client.create_tts(character, text, request_id=request_id)

    return make


ROUNDS = ("task_store_1", "gateway_B", "image_worker_2", "tts_worker_1")
#: How long a round's tasks get to complete while the killed replica is down (then it is
#: restarted and the stragglers get as long again, so a stall is told apart from a loss).
DOWN_WINDOW = 12.0


async def test_killing_any_one_replica_loses_nothing(
    replicas: Replicas, clients: dict[str, CharaiClient]
) -> None:
    """Rounds of 20 tasks (image and TTS, each provider call 1 s) submitted over 2 s through both
    gateways; 0.8 s in, one replica gets SIGKILL: task_store 1, then gateway B, then an image
    worker, then a TTS worker (one at a time: each is restarted, same address, before the next
    round; the last one stays down). Clients retry on the surviving gateway with the same
    request_id. Every accepted task must complete while the victim is still down (the survivors
    take over), as one task per request_id with exactly one COMPLETED event and a media URL that
    downloads. A task that completes only after the victim is back is reported as a stall."""
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    everything: list[task_pb2.Task] = []
    for victim in ROUNDS:
        character = f"char_kill_{victim}_{uuid.uuid4().hex[:6]}"
        stats = {"create_retries": 0}
        began = time.monotonic()
        deadline = began + DOWN_WINDOW

        async def submit(i: int, character: str = character, stats: dict[str, int] = stats) -> task_pb2.Task:
            await asyncio.sleep(i * 0.1)
            return await submit_with_failover(
                clients, "AB"[i % 2], image_or_tts(character, i), f"{character}-{i}", stats
            )

        async def one(i: int, deadline: float = deadline) -> tuple[task_pb2.Task, task_pb2.Task | None]:
            accepted = await submit(i)
            return accepted, await terminal_with_failover(clients, "AB"[i % 2], accepted.id, deadline)

        load = asyncio.gather(*(one(i) for i in range(20)))
        await asyncio.sleep(0.8)
        await replicas[victim].stop(signal.SIGKILL)
        killed_at = round(time.monotonic() - began, 2)
        outcome = await load
        down_for = round(time.monotonic() - began - killed_at, 2)
        done_while_down = [t for _, t in outcome if t is not None]
        stuck = [a for a, t in outcome if t is None]
        assert not replicas[victim].alive
        if victim != ROUNDS[-1] or stuck:  # the last victim need not come back (saves a start)
            await replicas.restart_ready(victim)
        late = await asyncio.gather(
            *(terminal_with_failover(clients, "A", a.id, time.monotonic() + DOWN_WINDOW) for a in stuck)
        )
        finished = done_while_down + [t for t in late if t is not None]
        if stuck:
            first = stuck[0].id
            # Who finished each stalled task, with which attempt: a stall that ends with attempt 1
            # on a worker of the killed store means that worker held the job all along.
            holders = sorted(
                f"{name}/attempt {line.get('attempt')}/{line.get('outcome')}"
                for a in stuck
                for name, r in replicas.replicas.items()
                if "worker" in name
                for line in job_lines(r, a.id)
            )
            problems.append(
                f"SIGKILL of {victim}: {len(stuck)} of 20 tasks did not complete within {DOWN_WINDOW} s "
                f"while it was down ({sum(t is not None for t in late)} completed once it was back, "
                f"{sum(t is None for t in late)} never); finished by {holders}; e.g. {first}\n"
                + trace(replicas, AssertionError(first))
            )
        statuses = [task_pb2.TaskStatus.Name(t.status) for t in finished]
        if statuses.count("TASK_STATUS_COMPLETED") != 20:
            problems.append(f"SIGKILL of {victim}: final statuses {sorted(statuses)} (20 accepted)")
        # One task per request_id: retries on the other gateway found the same task.
        listed = [t.id async for t in clients["A"].list({"characterId": character})]
        if sorted(listed) != sorted(a.id for a, _ in outcome):
            problems.append(f"SIGKILL of {victim}: {len(listed)} tasks stored for 20 request ids")
        everything += finished
        results.append(
            {
                "killed": victim,
                "killed_at_s": killed_at,
                "tasks": 20,
                "completed_while_down": len(done_while_down),
                "completed_after_restart": len(finished) - len(done_while_down),
                "create_retries_on_other_gateway": stats["create_retries"],
                "tasks_with_attempt_gt_1": sum(1 for t in finished if t.attempt > 1),
                "seconds_kill_to_all_done_or_window": down_for,
            }
        )
    REPORT["d_kills"] = results

    # Every task: exactly one COMPLETED event in the stored log, and its media downloads.
    async def check(task: task_pb2.Task) -> tuple[int, int]:
        events = await task_log(replicas.grpc_addr["A"], task.id)
        fresh = await clients["B"].get(task.id)
        size = len(await CharaiClient.download(media_url(fresh))) if fresh.status == COMPLETED else 0
        return sum(1 for e in events if e.type == EV.TASK_EVENT_TYPE_COMPLETED), size

    checked = await asyncio.gather(*(check(t) for t in everything))
    wrong = [t.id for t, (n, _) in zip(everything, checked, strict=True) if n != 1]
    if wrong:
        problems.append(f"tasks without exactly one COMPLETED event: {wrong}")
    if any(size <= 100 for _, size in checked):
        problems.append("a completed task's media URL did not download")
    REPORT["d_checked"] = {"tasks": len(everything), "one_completed_event": len(everything) - len(wrong)}
    assert not problems, "\n".join(problems)
