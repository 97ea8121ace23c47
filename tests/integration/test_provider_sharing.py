"""Providers are shared: the credential's limiter and breaker across worker processes, through
the real services (task_store, gateway, workers: each WorkerApp its own NATS connection, as two
processes would have) against the emulator.

* a bad key: 20 tasks fail with PROVIDER_AUTH after at most 2 provider calls; the breaker is
  visible in GetQueueStats, the CLI, the workers' metrics and the gateway's health (degraded,
  not down); workers restarted with the right key (a new credential) complete tasks again.
* an auth error inside a 200 answer opens the breaker the same way.
* two workers against a provider admitting 6 calls at once: after learning the limit, both
  together stay within it (a few above at most), and under 2 % of the calls are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest_asyncio
from charai.core.storeclient import StoreClient
from charai.devstack.inflight import InFlightProxy, inflight_proxy
from charai.emulator import EmulatorConfig, RunningEmulator, running_emulator
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.image_worker.app import build as build_image_worker
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings as StoreSettings
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from charai.tts_worker.app import build as build_tts_worker
from charai.worker.app import WorkerApp
from charai.worker.settings import ImageWorkerSettings, TtsWorkerSettings
from pydantic import SecretStr

from tests.conftest import NatsServer, eventually, run_cli
from tests.integration.test_operations import parse_metrics

TOKEN = "operator-token"
GOOD_KEY = "sk-good-0123456789abcdef"
BAD_KEY = "sk-bad-0123456789abcdef"
ENDED = (task_pb2.TASK_STATUS_COMPLETED, task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_CANCELLED)


@dataclasses.dataclass
class Stack:
    common: dict[str, Any]
    emu: RunningEmulator
    proxy: InFlightProxy
    store: TaskStoreApp
    gateway: GatewayApp
    stub: task_service_pb2_grpc.TaskServiceAsyncStub
    http: aiohttp.ClientSession

    @property
    def api(self) -> str:
        """The provider's base URL as the workers see it: through the counting proxy."""
        return self.proxy.url + "/api/paas/v4"

    def auth(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {TOKEN}"),)

    async def create_image(self, n: int, marker: str = "") -> task_pb2.Task:
        request = task_service_pb2.CreateTaskRequest(
            type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
            image=task_pb2.ImagePayload(
                character_id=f"char_{n:03d}",
                prompt=f"portrait {n} {marker}".strip(),
                resolution="1024x1024",
                view_type="front",
            ),
        )
        return (await self.stub.CreateTask(request, metadata=self.auth(), timeout=10)).task

    async def wait_end(self, task_id: str) -> task_pb2.Task:
        async for response in self.stub.WatchTask(
            task_service_pb2.WatchTaskRequest(id=task_id), metadata=self.auth(), timeout=60
        ):
            if response.event.task.status in ENDED:
                return response.event.task
        raise AssertionError("the watch ended before the task did")

    async def providers(self) -> list[task_service_pb2.ProviderState]:
        stats = await self.stub.GetQueueStats(
            task_service_pb2.GetQueueStatsRequest(), metadata=self.auth(), timeout=10
        )
        return list(stats.providers)

    async def healthz(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(f"http://127.0.0.1:{self.gateway.http_port}/healthz") as resp:
            return resp.status, await resp.json()

    async def charai(self, *args: str) -> str:
        code, out, err = await run_cli(f"127.0.0.1:{self.gateway.grpc_port}", TOKEN, *args, columns=250)
        assert code == 0, err
        return out

    @contextlib.asynccontextmanager
    async def workers(
        self, kind: str, key: str, count: int = 2, **settings: Any
    ) -> AsyncIterator[list[WorkerApp]]:
        """``count`` worker apps of ``kind``, each with its own NATS connection and worker id."""
        async with contextlib.AsyncExitStack() as stack:
            apps = []
            for n in range(count):
                common = {
                    **self.common,
                    "task_store_addr": f"127.0.0.1:{self.store.port}",
                    "provider_allow_private_urls": True,
                    "worker_id": f"{kind}-{key[3:6]}-{n}",
                    "metrics_addr": "127.0.0.1:0",
                    **settings,
                }
                if kind == "image":
                    app = build_image_worker(
                        ImageWorkerSettings(
                            **common,
                            image_api_base_url=self.api,
                            image_api_key=SecretStr(key),
                            image_async_mode="sync",
                        )
                    )
                else:
                    app = build_tts_worker(
                        TtsWorkerSettings(**common, tts_api_base_url=self.api, tts_api_key=SecretStr(key))
                    )
                apps.append(await stack.enter_async_context(app))
            yield apps


@contextlib.asynccontextmanager
async def running_stack(nats: NatsServer, tmp_path: Path, emulator: EmulatorConfig) -> AsyncIterator[Stack]:
    common: dict[str, Any] = {"nats_url": nats.url, "data_dir": tmp_path, "shutdown_grace_seconds": 1.0}
    store_settings = StoreSettings(**common, database_url=f"sqlite:///{tmp_path / 'tasks.db'}")
    async with (
        running_emulator(emulator) as emu,
        inflight_proxy(emu.url) as proxy,
        TaskStoreApp(store_settings, listen_addr="127.0.0.1:0") as store,
    ):
        gateway_settings = GatewaySettings(
            **common,
            task_store_addr=f"127.0.0.1:{store.port}",
            gateway_grpc_addr="127.0.0.1:0",
            gateway_http_addr="127.0.0.1:0",
            api_keys=SecretStr(f"{TOKEN}=ops"),
            operator_tenants="ops",
            media_signing_key="test-signing-key",
            submit_rate_per_tenant=0,
        )
        async with (
            GatewayApp(gateway_settings) as gateway,
            aiohttp.ClientSession() as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        ):
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            yield Stack(common, emu, proxy, store, gateway, stub, http)


@pytest_asyncio.fixture
async def keyed(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Stack]:
    """A provider that accepts only GOOD_KEY."""
    config = EmulatorConfig(latency_min=0, latency_max=0.01, api_key=GOOD_KEY)
    async with running_stack(nats_server, tmp_path, config) as stack:
        yield stack


async def test_a_bad_key_fails_20_tasks_with_at_most_2_calls_and_a_restart_with_the_right_key_heals(
    keyed: Stack,
) -> None:
    st = keyed
    async with st.workers("image", BAD_KEY) as workers:
        tasks = [await st.create_image(n) for n in range(20)]
        ends = [await st.wait_end(t.id) for t in tasks]
        assert [t.status for t in ends] == [task_pb2.TASK_STATUS_FAILED] * 20
        assert {t.error.code for t in ends} == {task_pb2.ERROR_CODE_PROVIDER_AUTH}
        assert all("CHARAI_IMAGE_API_KEY" in t.error.message and BAD_KEY not in t.error.message for t in ends)
        calls = st.emu.stats()["statuses"]
        assert calls.get("401", 0) + calls.get("200", 0) <= 2 and calls.get("401", 0) >= 1, calls

        # Visible: GetQueueStats (through the gateway), the CLI, the workers' metrics, health.
        credential = workers[0].gate.base.credential if workers[0].gate else "?"
        await eventually(lambda: all(w.gate and w.gate.view.breaker.state.value == "open" for w in workers))
        (state,) = await st.providers()
        assert (state.credential_id, state.type, state.model, state.workers) == (
            credential,
            task_pb2.TASK_TYPE_IMAGE_GENERATION,
            "glm-image",
            2,
        )
        assert state.breaker_state == task_service_pb2.BREAKER_STATE_OPEN
        assert state.breaker_reason == task_pb2.ERROR_CODE_PROVIDER_AUTH
        assert state.HasField("breaker_retry_time") and BAD_KEY not in str(state)
        as_json = json.loads(await st.charai("--json", "stats"))
        assert as_json["providers"][0]["breakerState"] == "BREAKER_STATE_OPEN"
        table = await st.charai("stats")
        assert credential in table and "open (provider_auth)" in table, table
        for worker in workers:
            async with st.http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics") as resp:
                samples = parse_metrics(await resp.text())
            labels = f'credential="{credential}",kind="image",model="glm-image"'
            assert samples[f"charai_provider_breaker_state{{{labels}}}"] == 2
        await eventually(lambda: st.gateway.health_watcher is not None and st.gateway.health_watcher.degraded)
        status, health = await st.healthz()
        assert (status, health["status"]) == (200, "degraded"), health
        assert any(credential in reason and "PROVIDER_AUTH" in reason for reason in health["degraded"])

    # The key is fixed and the workers restarted: a new credential, its breaker closed.
    async with st.workers("image", GOOD_KEY) as workers:
        tasks = [await st.create_image(100 + n) for n in range(3)]
        ends = [await st.wait_end(t.id) for t in tasks]
        assert [t.status for t in ends] == [task_pb2.TASK_STATUS_COMPLETED] * 3
        (state,) = await st.providers()  # the old credential is used by nobody: not listed
        assert (
            state.credential_id != credential and state.breaker_state == task_service_pb2.BREAKER_STATE_CLOSED
        )
        assert state.verified and state.workers == 2
        await eventually(
            lambda: st.gateway.health_watcher is not None and not st.gateway.health_watcher.degraded
        )
        assert (await st.healthz())[1]["status"] == "serving"


async def test_an_auth_error_inside_a_200_answer_opens_the_breaker_too(keyed: Stack) -> None:
    """A provider that answers 200 with an auth error in the body (Zhipu code 1000 in-band): the
    task fails as a bad response, and the credential's breaker opens as for a 401, so the other
    tasks fail PROVIDER_AUTH without calling (their retries too), instead of each calling the
    provider on every attempt."""
    st = keyed
    async with st.workers("image", GOOD_KEY) as workers:
        tasks = [await st.create_image(n, "[[json-error-200:1000]]") for n in range(20)]
        ends = [await st.wait_end(t.id) for t in tasks]
        assert [t.status for t in ends] == [task_pb2.TASK_STATUS_FAILED] * 20
        assert {t.error.code for t in ends} == {task_pb2.ERROR_CODE_PROVIDER_AUTH}, [t.error for t in ends]
        # As with a 401: the unverified key's trial call, at most one more (without the breaker
        # every attempt of every task calls: 60 here).
        calls = st.emu.stats()["statuses"].get("200", 0)
        assert 1 <= calls <= 2, calls
        await eventually(lambda: all(w.gate and w.gate.view.breaker.state.value == "open" for w in workers))
        (state,) = await st.providers()
        assert state.breaker_state == task_service_pb2.BREAKER_STATE_OPEN
        assert state.breaker_reason == task_pb2.ERROR_CODE_PROVIDER_AUTH


async def test_two_workers_keep_together_within_the_learned_limit(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Two TTS workers (16 jobs each at once) against a provider admitting 6 calls: a first
    batch teaches the limit; over the second, the calls both have at the provider at once
    (counted by a proxy in front of it) stay within the learned limit plus 2, and under 2 % of
    the calls are refused."""
    config = EmulatorConfig(latency_min=0.05, latency_max=0.05, max_concurrency=6)
    async with running_stack(nats_server, tmp_path, config) as st, contextlib.AsyncExitStack() as stack:
        workers = await stack.enter_async_context(st.workers("tts", GOOD_KEY, tts_concurrency=16))
        store = await stack.enter_async_context(StoreClient(f"127.0.0.1:{st.store.port}", ""))

        async def batch(tag: str, n: int) -> None:
            requests = [
                task_service_pb2.CreateTaskRequest(
                    type=task_pb2.TASK_TYPE_TTS_GENERATION,
                    tts=task_pb2.TtsPayload(
                        character_id="c", text=f"{tag} {i}", voice_style="tongtong", response_format="pcm"
                    ),
                )
                for i in range(n)
            ]
            ids = [
                t.id
                for chunk in range(0, n, 100)
                for t in await store.batch_create_tasks("t", requests[chunk : chunk + 100])
            ]

            async def done() -> bool:
                for i in ids:
                    if (await store.get_task("t", i)).status not in ENDED:
                        return False
                return True

            # Every call answered (the emulator's count since its last reset), then every task ended.
            await eventually(lambda: st.emu.stats()["statuses"].get("200", 0) >= n, timeout=180, interval=0.2)
            await eventually(done, timeout=60, interval=0.5)
            tasks = [await store.get_task("t", i) for i in ids]
            assert {t.status for t in tasks} == {task_pb2.TASK_STATUS_COMPLETED}

        await batch("learn", 100)
        st.emu.reset()
        st.proxy.reset_peak()
        await batch("steady", 400)
        stats = st.emu.stats()
        limits = [w.gate.limit if w.gate else None for w in workers]
    calls, refused = int(stats["calls"]["audio.speech"]), int(stats["concurrency"]["rejected"])
    assert calls - refused == 400
    learned = max(x or 0 for x in limits)
    assert 4 <= learned <= 7, limits
    assert st.proxy.peak <= learned + 2, (st.proxy.peak, limits)
    assert refused <= 0.02 * calls, f"{refused} of {calls} calls refused"
