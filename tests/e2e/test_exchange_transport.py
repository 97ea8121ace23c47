"""``CHARAI_EXCHANGE_STREAM`` end to end: with it on (the default) the gateway's and the worker's
``Exchange`` requests travel on one long-lived ``ExchangeStream`` call each (task_store's
``charai_exchange_streams_open`` counts them); with it off, as unary ``Exchange`` calls (no
stream open). Either way a task is created, claimed, reported and completed."""

from __future__ import annotations

import aiohttp
import pytest
from charai.client import CharaiClient
from charai.devstack.stack import free_port
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually

from .conftest import fast_stack


async def _scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.parametrize(("setting", "streams"), [("true", 2), ("false", 0)])
async def test_a_task_completes_over_either_exchange_transport(
    tmp_path_factory: pytest.TempPathFactory, setting: str, streams: int
) -> None:
    port = free_port()
    metrics = {"task_store": {"CHARAI_METRICS_ADDR": f"127.0.0.1:{port}"}}
    services = ("task_store", "gateway", "tts_worker")
    async with (
        fast_stack(tmp_path_factory, services, metrics, CHARAI_EXCHANGE_STREAM=setting) as stack,
        CharaiClient(stack.gateway_grpc) as client,
    ):
        task = await client.create_tts("char_transport", f"exchange stream {setting}")
        events = [event async for event in client.watch(task.id)]
        # The end, live; or, on a busy machine, a snapshot taken after the task had completed.
        assert events[-1].type in (task_pb2.TASK_EVENT_TYPE_COMPLETED, task_pb2.TASK_EVENT_TYPE_SNAPSHOT)
        assert events[-1].task.status == task_pb2.TASK_STATUS_COMPLETED
        assert events[-1].task.tts_result.size_bytes > 0

        async def counted() -> bool:
            samples = await _scrape(port)
            # The create, the claim, the progress and the completion: Exchange requests either way.
            return (
                samples.get('charai_rpc_requests_total{code="OK",method="Exchange"}', 0) >= 2
                and samples.get("charai_exchange_streams_open") == streams
            )

        await eventually(counted, timeout=30)
