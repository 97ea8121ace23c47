"""Webhooks through the whole stack (task_store's outbox, JetStream, the webhook sender) to a
real HTTP receiver that verifies every signature with the ``standardwebhooks`` library.

The receiver answers by path: ``/flaky`` answers each webhook-id 500, then resets the
connection, then 200; ``/throttled`` answers 429 with ``Retry-After: 2`` once per id; ``/gone``
410; ``/moved`` a 302 to ``/ok``; ``/ok`` 200.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from charai.devstack.stack import ALL_SERVICES, Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import eventually, later_port
from tests.webhook_receiver import Receiver

from .conftest import fast_stack

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub as Api

pytestmark = pytest.mark.asyncio(loop_scope="module")

SETTINGS = {
    "CHARAI_WEBHOOK_ALLOW_PRIVATE_URLS": "true",  # the receiver is on loopback
    "CHARAI_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2,0.2,0.2",
    "CHARAI_WEBHOOK_DISABLE_AFTER": "0",  # only a 410 disables
    "CHARAI_WEBHOOK_PROGRESS_INTERVAL_MS": "100",
}
METRICS_PORT = later_port()
DELIVERED = task_service_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED
FAILED = task_service_pb2.WEBHOOK_DELIVERY_STATUS_FAILED


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> AsyncIterator[Stack]:
    defaults = {"CHARAI_TENANT_WEBHOOKS": f"default={receiver.url}/default"}
    metrics = {"webhook_sender": {"CHARAI_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}"}}
    async with fast_stack(tmp_path_factory, ALL_SERVICES, metrics, {**SETTINGS, **defaults}) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(stack: Stack) -> AsyncIterator[Api]:
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)  # type: ignore[misc]


async def submit(api: Api, url: str, events: list[str] | None = None) -> task_pb2.Task:
    request = task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(
            text="Hello there.", voice_style="tongtong", character_id=f"c_{uuid.uuid4().hex[:8]}"
        ),
        webhook=task_pb2.Webhook(url=url, events=events or []),
    )
    return (await api.CreateTask(request)).task


async def deliveries(api: Api, task_id: str) -> list[task_service_pb2.WebhookDelivery]:
    page = await api.ListWebhookDeliveries(task_service_pb2.ListWebhookDeliveriesRequest(task_id=task_id))
    return sorted(page.deliveries, key=lambda d: d.sequence)


async def settled(api: Api, task_id: str, count: int) -> None:
    """Waits until the task has ``count`` deliveries and none is pending."""

    async def done() -> bool:
        found = await deliveries(api, task_id)
        return len(found) >= count and all(d.status in (DELIVERED, FAILED) for d in found)

    await eventually(done, timeout=90, interval=0.1)


async def secret(api: Api) -> str:
    return str((await api.GetWebhookSecret(task_service_pb2.GetWebhookSecretRequest())).secret)


async def test_each_event_arrives_signed_in_order_and_once_per_webhook_id_after_500_and_a_reset(
    api: Api, receiver: Receiver
) -> None:
    task = await submit(api, f"{receiver.url}/flaky", ["started", "completed"])
    await settled(api, task.id, 2)
    found = await deliveries(api, task.id)
    assert [d.event_type for d in found] == ["task.started", "task.completed"]
    assert all(d.status == DELIVERED for d in found), found
    signer = Webhook(await secret(api))
    hits = [h for h in receiver.hits if h.path == "/flaky" and h.payload["data"]["id"] == task.id]
    for delivery in found:
        mine = [h for h in hits if h.id == delivery.id]
        # 500, then a reset, then 200: three requests with one webhook-id, nothing after the 200.
        assert [h.answered for h in mine] == [500, 0, 200], delivery
        assert [a.http_status for a in delivery.attempts] == [500, 0, 200]
        assert delivery.attempts[1].error  # the reset is recorded
        for hit in mine:
            signer.verify(hit.body, hit.headers)  # raises on a bad signature
            assert hit.payload["type"] == delivery.event_type
            assert hit.payload["data"]["sequence"] == delivery.sequence
    # Order: the completed delivery was first sent after started was delivered.
    started_ok = next(h.time for h in hits if h.id == found[0].id and h.answered == 200)
    assert min(h.time for h in hits if h.id == found[1].id) >= started_ok
    final = [h for h in hits if h.id == found[1].id][-1].payload["data"]
    assert final["status"] == "completed" and final["result"]["audioUrl"].startswith("http")


async def test_a_forged_or_stale_signature_is_refused_by_the_library(api: Api, receiver: Receiver) -> None:
    """The control: verification can fail, so the passes above mean something."""
    task = await submit(api, f"{receiver.url}/ok")
    await settled(api, task.id, 1)
    hit = next(h for h in receiver.hits if h.path == "/ok" and h.payload["data"]["id"] == task.id)
    Webhook(await secret(api)).verify(hit.body, hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(hit.body, hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(await secret(api)).verify(hit.body.replace(b"completed", b"failed"), hit.headers)


async def test_retry_after_on_a_429_delays_the_next_attempt(api: Api, receiver: Receiver) -> None:
    task = await submit(api, f"{receiver.url}/throttled")
    await settled(api, task.id, 1)
    (delivery,) = await deliveries(api, task.id)
    assert [a.http_status for a in delivery.attempts] == [429, 200]
    first, second = (h.time for h in receiver.hits if h.path == "/throttled" and h.id == delivery.id)
    assert second - first >= 2.0  # the schedule alone would retry after 0.2 s


async def test_a_410_disables_the_endpoint_and_a_redirect_is_a_failure(api: Api, receiver: Receiver) -> None:
    moved = await submit(api, f"{receiver.url}/moved")
    await settled(api, moved.id, 1)
    (delivery,) = await deliveries(api, moved.id)
    assert delivery.status == FAILED
    assert [a.http_status for a in delivery.attempts] == [302]
    assert "redirect" in delivery.attempts[0].error
    assert not [h for h in receiver.hits if h.path == "/ok" and h.payload["data"]["id"] == moved.id]

    gone = await submit(api, f"{receiver.url}/gone")
    await settled(api, gone.id, 1)
    (first,) = await deliveries(api, gone.id)
    assert first.status == FAILED and [a.http_status for a in first.attempts] == [410]
    later = await submit(api, f"{receiver.url}/gone")
    await settled(api, later.id, 1)
    (second,) = await deliveries(api, later.id)
    assert second.status == FAILED and not second.attempts  # disabled: never sent
    assert receiver.seen("/gone", second.id) == 0

    # A redelivery re-enables the endpoint and sends the same webhook-id again.
    answer = await api.RedeliverWebhook(task_service_pb2.RedeliverWebhookRequest(delivery_id=second.id))
    assert answer.redelivered == 1
    await eventually(lambda: receiver.seen("/gone", second.id) == 1, timeout=60)


async def test_rotation_signs_with_both_secrets_during_the_grace(api: Api, receiver: Receiver) -> None:
    old = await secret(api)
    rotated = await api.RotateWebhookSecret(task_service_pb2.RotateWebhookSecretRequest())
    assert rotated.secret.startswith("whsec_") and rotated.secret != old
    assert await secret(api) == rotated.secret
    task = await submit(api, f"{receiver.url}/ok")
    await settled(api, task.id, 1)
    hit = next(h for h in receiver.hits if h.path == "/ok" and h.payload["data"]["id"] == task.id)
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(hit.body, hit.headers)
    Webhook(rotated.secret).verify(hit.body, hit.headers)


async def test_bad_webhooks_are_refused_naming_the_field(api: Api) -> None:
    for url, events, field in (
        ("ftp://example.com/x", [], "webhook.url"),
        ("https://user:pw@example.com/x", [], "webhook.url"),
        ("https://example.com/x", ["finished"], "webhook.events"),
        # urllib cannot read these (they were UNKNOWN, a ValueError), or the port is unusable.
        ("http://[::1", [], "webhook.url"),
        ("http://[zz]/x", [], "webhook.url"),
        ("https://example.com:99999/x", [], "webhook.url"),
        ("https://example.com:0/x", [], "webhook.url"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(api, url, events)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or ""), caught.value.details()
    # RedeliverWebhook: checked at the gateway, the fields named.
    for request, field in (
        (task_service_pb2.RedeliverWebhookRequest(delivery_id="x" * 5000), "delivery_id"),
        (task_service_pb2.RedeliverWebhookRequest(since=Timestamp(seconds=10**12)), "since"),
        (task_service_pb2.RedeliverWebhookRequest(), "delivery_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.RedeliverWebhook(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(f"invalid request: {field}:"), caught.value.details()


async def test_an_access_token_cannot_reach_the_webhook_calls(api: Api) -> None:
    """Browser tokens reach tasks, never the tenant's webhook secret or deliveries."""
    issued = await api.CreateAccessToken(
        task_service_pb2.CreateAccessTokenRequest(metadata={"characterId": "char_001"})
    )
    bearer = (("authorization", f"Bearer {issued.token}"),)
    calls: list[Any] = [
        api.GetWebhookSecret(task_service_pb2.GetWebhookSecretRequest(), metadata=bearer),
        api.RotateWebhookSecret(task_service_pb2.RotateWebhookSecretRequest(), metadata=bearer),
        api.ListWebhookDeliveries(task_service_pb2.ListWebhookDeliveriesRequest(), metadata=bearer),
        api.RedeliverWebhook(task_service_pb2.RedeliverWebhookRequest(delivery_id="msg_x"), metadata=bearer),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()


async def test_rest_takes_a_webhook_and_names_a_bad_one(stack: Stack, api: Api, receiver: Receiver) -> None:
    body = {
        "type": "tts_generation",
        "payload": {"characterId": "char_rest", "text": "Hi.", "voiceStyle": "tongtong"},
        "webhook": {"url": f"{receiver.url}/ok", "events": ["completed"]},
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.gateway_http}/api/tasks", json=body) as response:
            assert response.status in (200, 201), await response.text()
            task = await response.json()
        assert task["webhook"] == {"url": f"{receiver.url}/ok", "events": ["completed"]}
        await settled(api, task["id"], 1)
        assert [d.status for d in await deliveries(api, task["id"])] == [DELIVERED]
        bad = {**body, "webhook": {"url": f"{receiver.url}/ok", "events": "completed", "secret": "x"}}
        async with http.post(f"{stack.gateway_http}/api/tasks", json=bad) as response:
            assert response.status == 400
            text = await response.text()
        assert "webhook.events" in text and "webhook.secret" in text


async def cli(stack: Stack, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "charai.client.cli",
        "--target",
        stack.gateway_grpc,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return int(process.returncode or 0), out.decode()


async def test_the_cli_submits_with_a_webhook_lists_and_redelivers(
    stack: Stack, api: Api, receiver: Receiver
) -> None:
    code, out = await cli(
        stack,
        "tts",
        "--character",
        "char_cli",
        "--text",
        "Hi.",
        "--webhook",
        f"{receiver.url}/ok",
        "--no-follow",
    )
    assert code == 0, out
    task_id = out.strip().splitlines()[-1]
    await settled(api, task_id, 1)
    code, out = await cli(stack, "webhooks", "list", "--task", task_id, "--json")
    assert code == 0, out
    (delivery,) = json.loads(out)["deliveries"]
    assert (delivery["status"], delivery["eventType"]) == (
        "WEBHOOK_DELIVERY_STATUS_DELIVERED",
        "task.completed",
    )
    code, out = await cli(stack, "webhooks", "redeliver", delivery["id"])
    assert (code, out.strip()) == (0, "1 queued again")
    await eventually(lambda: receiver.seen("/ok", delivery["id"]) == 2, timeout=60)
    code, out = await cli(stack, "webhooks", "secret")
    assert code == 0 and out.strip() == await secret(api)


async def test_a_task_without_a_webhook_goes_to_the_tenants_default_endpoint(
    api: Api, receiver: Receiver
) -> None:
    request = task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_TTS_GENERATION,
        tts=task_pb2.TtsPayload(text="Default.", voice_style="tongtong", character_id="char_default"),
    )
    task = (await api.CreateTask(request)).task
    assert task.webhook.url == f"{receiver.url}/default"
    await settled(api, task.id, 1)
    (delivery,) = await deliveries(api, task.id)
    assert delivery.status == DELIVERED and receiver.seen("/default", delivery.id) == 1


async def test_the_sender_counts_attempts_by_host_and_outcome(api: Api, receiver: Receiver) -> None:
    task = await submit(api, f"{receiver.url}/flaky")
    await settled(api, task.id, 1)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{METRICS_PORT}/metrics") as response,
    ):
        text = await response.text()
    for outcome in ("500", "none", "200"):
        assert f'charai_webhook_attempts_total{{host="127.0.0.1",outcome="{outcome}"}}' in text, outcome
    assert "charai_webhook_attempt_duration_seconds_bucket" in text and "charai_webhooks_in_flight" in text
