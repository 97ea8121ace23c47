"""Usage and budgets through the real stack and the provider emulator.

The emulator keeps its own account of every generation call (``/_emulator/stats`` ``log``: the
status of each answer, the characters sent, the images and seconds of audio delivered). The
usage charai reports (GetUsage, ``Task.usage``, ``GET /api/usage``, ``charai usage``) must add up
exactly to the calls the emulator answered with 200: a 500 is not charged, and a paid call whose
attempt then failed (audio that was not audio) is. A tenant whose budget is reached is refused
at create, over gRPC (QuotaFailure naming the budget) and REST (429), with nothing stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.client.client import CharaiError
from charai.core.domain import usage as rules
from charai.core.domain.prices import PriceTable
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.conftest import FAST_SETTINGS
from tests.e2e.helpers import collect, emulator_stats, unique

ACME, OPS, CAPPED = "acme-key", "ops-key", "capped-key"
CHARAI = str(Path(sys.executable).parent / "charai")
TENANTS = """
[tenants.capped]
budgets = [{ period = "month", limit = 1, unit = "images" }]
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    data = Path(tmp_path_factory.mktemp("usage-stack"))
    (data / "tenants.toml").write_text(TENANTS)
    env = dict(
        FAST_SETTINGS,
        CHARAI_API_KEYS=f"{ACME}=acme,{OPS}=ops,{CAPPED}=capped",
        CHARAI_OPERATOR_TENANTS="ops",
        CHARAI_TENANTS_FILE=str(data / "tenants.toml"),
    )
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    async with Stack(
        data / "stack",
        env,
        free_ports=True,
        echo=echo,
        emulator_args=["--latency", "0.05:0.15", "--async-poll-steps", "2"],
    ) as running:
        yield running


async def finished(client: CharaiClient, task: task_pb2.Task) -> task_pb2.Task:
    events = await collect(client, task.id, timeout=60)
    assert events[-1].task.status == task_pb2.TASK_STATUS_COMPLETED, events[-1].task
    return events[-1].task


def provider_account(stack: Stack, tag: str) -> dict[str, Any]:
    """What the emulator delivered, among this test's generation calls (``tag`` is in each prompt
    and text): the calls a provider charges for are an image job that delivered its picture (an
    async job that failed is not charged) and a speech call answered 200 (even if what it sent
    was not audio); and the error statuses it answered."""
    log = [r for r in emulator_stats(stack)["log"] if tag in r["text"] and r["route"] != "async-result"]
    speech = [r for r in log if "speech" in r["route"] and r["status"] == 200]
    paid = speech + [r for r in log if "images" in r["route"] and r["images"] > 0]
    return {
        "calls": len(paid),
        "images": sum(r["images"] for r in paid),
        "speech_characters": sum(r["input_chars"] for r in speech),
        "audio_seconds": sum(r["audio_seconds"] or 0.0 for r in speech),
        "speech_calls": [(r["model"], r["input_chars"], r["audio_seconds"] or 0.0) for r in speech],
        "image_calls": [
            (r["model"], r["size"], r["quality"] or "", r["images"]) for r in paid if r not in speech
        ],
        "errors": sorted(r["status"] for r in log if r["status"] != 200),
        "log": [(r["route"], r["status"], r["mode"], r["images"], r["input_chars"]) for r in log],
    }


def expected_cost(account: dict[str, Any]) -> float:
    """The emulator's calls priced by the same table task_store uses (the built-in one here)."""
    table = PriceTable()
    micros = sum(
        table.cost_micros(rules.image_call("zhipu", model, size, quality, images))
        for model, size, quality, images in account["image_calls"]
    )
    micros += sum(
        table.cost_micros(rules.speech_call("zhipu", model, "x" * chars, seconds))
        for model, chars, seconds in account["speech_calls"]
    )
    return micros / 1e6


async def test_usage_adds_up_to_the_calls_the_provider_answered(stack: Stack) -> None:
    tag = unique("usage")
    async with CharaiClient(stack.gateway_grpc, ACME) as acme:
        made = [
            await acme.create_image("char_u1", f"a lighthouse at dusk {tag}", resolution="1024x1024"),
            # The first job fails at the provider (not charged), the next one delivers.
            await acme.create_image("char_u1", f"[[server*1]] a harbour {tag}", resolution="1024x1024"),
            await acme.create_tts("char_u1", f"Good evening, traveller. {tag}"),
            # Paid for, then refused by the worker (not audio): charged, and retried.
            await acme.create_tts("char_u1", f"[[garbage*1]] Welcome back. {tag}", response_format="mp3"),
            # A 500 first (not charged), then the audio.
            await acme.create_tts("char_u1", f"[[server*1]] Safe travels. {tag}"),
        ]
        done = [await finished(acme, task) for task in made]
        account = provider_account(stack, tag)
        assert account["errors"] == [500], account["log"]
        assert (account["calls"], account["images"]) == (6, 2), account["log"]
        report = await acme.usage()
        rows = list(report.rows)
        assert {r.tenant for r in rows} == {"acme"}
        assert {(r.provider, r.model) for r in rows} == {("zhipu", "glm-image"), ("zhipu", "glm-tts")}
        got = {
            "calls": sum(r.calls for r in rows),
            "images": sum(r.images for r in rows),
            "speech_characters": sum(r.speech_characters for r in rows),
        }
        assert got == {k: account[k] for k in got}
        assert sum(r.audio_seconds for r in rows) == pytest.approx(account["audio_seconds"], abs=1e-5)
        assert sum(r.cost_usd for r in rows) == pytest.approx(expected_cost(account), abs=1e-9)
        # Each task shows its own share, and the shares add up to the same figures.
        by_task = [t.usage for t in done]
        assert [u.calls for u in by_task] == [1, 1, 1, 2, 1]
        assert sum(u.speech_characters for u in by_task) == account["speech_characters"]
        assert sum(u.cost_usd for u in by_task) == pytest.approx(expected_cost(account), abs=1e-9)
        assert (await acme.get(made[3].id)).usage == by_task[3]
        assert by_task[3].speech_characters == 2 * len(made[3].tts.text)  # both calls were paid

        # Only operators see other tenants.
        with pytest.raises(CharaiError) as err:
            await acme.usage(tenant="capped")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    async with CharaiClient(stack.gateway_grpc, OPS) as ops:
        everyone = await ops.usage(all_tenants=True)
        assert [r for r in everyone.rows if r.tenant == "acme"] == rows
        assert list((await ops.usage(tenant="acme")).rows) == rows


def quota_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            found += [(v.subject, v.description) for v in quota.violations]
    return found


async def test_a_tenant_over_budget_is_refused_with_the_budget_named(stack: Stack) -> None:
    tag = unique("budget")
    async with CharaiClient(stack.gateway_grpc, CAPPED) as capped:
        first = await capped.create_image("char_b1", f"a kite {tag}", resolution="1024x1024")
        assert (await finished(capped, first)).usage.images == 1
        mine = [t.id async for t in capped.list()]
    budget = ("tenant:capped", "month/images budget 1 reached (1 spent)")
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        request = task_service_pb2.CreateTaskRequest(
            type=task_pb2.TASK_TYPE_TTS_GENERATION,
            tts=task_pb2.TtsPayload(character_id="char_b1", text=f"hello {tag}", voice_style="tongtong"),
        )
        metadata = (("authorization", f"Bearer {CAPPED}"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateTask(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_violations(err.value) == [budget]
        batch = task_service_pb2.BatchCreateTasksRequest(requests=[request, request])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.BatchCreateTasks(batch, metadata=metadata)
        assert quota_violations(err.value) == [budget]

    async with aiohttp.ClientSession(stack.gateway_http) as http:
        headers = {"Authorization": f"Bearer {CAPPED}"}
        body = {
            "type": "image_generation",
            "payload": {"characterId": "char_b1", "prompt": f"another kite {tag}", "resolution": "1024x1024"},
        }
        async with http.post("/api/tasks", json=body, headers=headers) as reply:
            assert reply.status == 429
            error = (await reply.json())["error"]
            assert "month/images budget 1 reached (1 spent)" in error["message"]
            assert int(reply.headers["Retry-After"]) > 0  # until the month ends
        async with http.get("/api/usage", headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            usage = await reply.json()
        assert [(r["tenant"], r["model"], r["images"]) for r in usage["rows"]] == [("capped", "glm-image", 1)]
        [status] = usage["budgets"]
        assert (status["period"], status["unit"], status["limit"], status["spent"], status["reached"]) == (
            "month",
            "images",
            1,
            1,
            True,
        )
        async with http.get("/api/usage?startDay=someday", headers=headers) as reply:
            assert reply.status == 400
            assert [v["field"] for v in (await reply.json())["error"]["fieldViolations"]] == ["startDay"]
    async with CharaiClient(stack.gateway_grpc, CAPPED) as capped:
        assert [t.id async for t in capped.list()] == mine  # nothing stored by the refusals


async def test_charai_usage_prints_the_table(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(CHARAI_TARGET=stack.gateway_grpc, CHARAI_TOKEN=OPS, COLUMNS="200")
    process = await asyncio.create_subprocess_exec(
        CHARAI, "usage", "--all", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[:4] == ["DAY", "TENANT", "PROVIDER", "MODEL"]
    capped = [line.split() for line in lines if " capped " in line]
    assert capped and capped[0][2:5] == ["zhipu", "glm-image", "1"]
    process = await asyncio.create_subprocess_exec(
        CHARAI,
        "usage",
        "--json",
        env={**env, "CHARAI_TOKEN": CAPPED},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["budgets"][0]["reached"] is True
    assert [(r["tenant"], r["images"]) for r in answer["rows"]] == [("capped", "1")]  # int64: a string
