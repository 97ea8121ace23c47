"""``kill -9`` of the webhook sender and of task_store with 200 deliveries pending.

Arranged, not raced: the receiver holds every request at its gate, so when both are killed the
sender has deliveries in flight (claimed, posted, unanswered) and the rest wait in task_store's
outbox or in JetStream. After the restarts every delivery arrives, and the receiver never sees
a new delivery for a task: a repeat is only ever the same ``webhook-id`` again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from charai.devstack.stack import ALL_SERVICES, Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from tests.conftest import eventually
from tests.webhook_receiver import Receiver

from .conftest import StackFactory

TASKS = 200
SETTINGS = {
    "CHARAI_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
    "CHARAI_WEBHOOK_RETRY_SCHEDULE": "0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "CHARAI_WEBHOOK_ACK_WAIT_SECONDS": "3",  # a dead sender's jobs come back soon
    "CHARAI_WEBHOOK_CLAIM_SECONDS": "3",  # and its claims end soon
    "CHARAI_WEBHOOK_TIMEOUT_SECONDS": "60",  # the receiver's gate holds requests meanwhile
}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


async def submit(stack: Stack, url: str) -> list[str]:
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        api = task_service_pb2_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
        character = f"c_{uuid.uuid4().hex[:8]}"

        async def one(number: int) -> str:
            request = task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                tts=task_pb2.TtsPayload(
                    text=f"Line {number}.", voice_style="tongtong", character_id=character
                ),
                webhook=task_pb2.Webhook(url=url),
                request_id=f"{character}-{number}",
            )
            response = await api.CreateTask(request)
            return str(response.task.id)

        return list(await asyncio.gather(*(one(n) for n in range(TASKS))))


async def statuses(stack: Stack, task_ids: list[str]) -> Counter[int]:
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        api = task_service_pb2_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
        found: Counter[int] = Counter()
        token = ""
        while True:
            page = await api.ListWebhookDeliveries(
                task_service_pb2.ListWebhookDeliveriesRequest(page_size=500, page_token=token)
            )
            found.update(d.status for d in page.deliveries if d.task_id in task_ids)
            token = page.next_page_token
            if not token:
                return found


async def test_kill_sender_and_task_store_with_200_deliveries_pending(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    async with make_stack(SETTINGS, services=ALL_SERVICES) as stack:
        receiver.gate.clear()
        task_ids = await submit(stack, f"{receiver.url}/ok")
        # The sender holds many deliveries in flight (its concurrency), the rest wait behind them.
        await eventually(lambda: len(receiver.arrived) >= 20, timeout=120)
        await stack.kill_service("webhook_sender")
        await stack.kill_service("task_store")
        in_flight = {delivery_id for _, delivery_id in receiver.arrived}
        assert 0 < len(in_flight) < TASKS  # some posted and unanswered, the rest still waiting
        receiver.gate.set()  # answers now go to a dead sender
        await stack.start_service("task_store")
        await stack.wait_ready("task_store")
        await stack.start_service("webhook_sender")
        await stack.wait_ready("webhook_sender")

        delivered = task_service_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED

        async def all_delivered() -> bool:
            try:
                return (await statuses(stack, task_ids))[delivered] == TASKS
            except grpc.aio.AioRpcError:
                return False

        await eventually(all_delivered, timeout=180, interval=0.5)
        answered = [h for h in receiver.hits if h.answered == 200]
        by_task: dict[str, set[str]] = {}
        for hit in receiver.hits:
            by_task.setdefault(hit.payload["data"]["id"], set()).add(hit.id)
        assert set(by_task) == set(task_ids)
        # One webhook-id per task: a repeat was a retry of the same delivery, never a new one.
        assert all(len(ids) == 1 for ids in by_task.values()), {
            t: i for t, i in by_task.items() if len(i) > 1
        }
        assert {h.id for h in answered} == set().union(*by_task.values())
        assert all(h.payload["type"] == "task.completed" for h in receiver.hits)
        # The deliveries in flight at the kill were sent again (their answers were lost), as
        # retries of the same delivery.
        repeats = {delivery_id for delivery_id, n in Counter(h.id for h in receiver.hits).items() if n > 1}
        assert repeats and repeats <= in_flight
