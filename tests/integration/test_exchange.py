"""The batched data plane: ``Exchange`` on a real task_store (both backends) and the coalescing
StoreClient that gateways and workers use. Concurrent calls share Exchange calls, each command is
answered as its unary RPC would be (refusals with the same code and details), one command's
refusal leaves the others alone, and a task_store without ``Exchange`` gets unary calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import structlog
from charai.core.coalesce import answer_error
from charai.core.domain.errors import ErrorKind
from charai.core.storeclient import StoreClient
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc as spb_grpc
from charai.task_store.app import TaskStoreApp
from charai.task_store.grpc_api import MAX_EXCHANGE, TaskStoreServicer
from charai.task_store.settings import Settings
from charai.task_store.store import TaskStore
from charai.taskapi import error_details
from charai.tasks.v1 import task_pb2, task_service_pb2
from structlog.testing import capture_logs

from tests.integration.conftest import Database
from tests.integration.store_requests import (
    COMPLETED,
    DEFER,
    EV,
    QUEUED,
    RUN,
    RUNNING,
    TTS,
    complete_req,
    fail_req,
    image_request,
    image_result,
    tts_request,
)
from tests.integration.test_task_store_api import app_settings

if TYPE_CHECKING:
    from tests.conftest import NatsServer

DONE, RETRY = spb.SETTLE_OUTCOME_DONE, spb.SETTLE_OUTCOME_RETRY
PENDING = task_service_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
DELIVERED = task_service_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED


def refusal(raw: bytes) -> tuple[grpc.StatusCode, list[str]]:
    """A refused command's code and the fields its error names."""
    error = answer_error(raw)
    return error.code(), [field for field, _ in error_details(error).field_violations]


@contextlib.asynccontextmanager
async def coalescing(
    settings: Settings, stream: bool = False
) -> AsyncIterator[tuple[TaskStoreApp, StoreClient]]:
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}", coalesce=True, stream=stream) as client,
    ):
        yield app, client


async def test_concurrent_calls_share_exchange_calls(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # Every job released at create (no fair-share holding): a held task's claim is answered DONE.
    async with coalescing(app_settings(nats_server, tmp_path, db, dispatch_buffer=100)) as (app, client):
        assert client.coalescer is not None
        tasks = await asyncio.gather(*(client.create_task("acme", image_request()) for _ in range(50)))
        assert len({t.id for t in tasks}) == 50
        # Created together: one call carried them (two at most, if the first left early).
        assert client.coalescer.commands == 50
        assert client.coalescer.calls <= 2
        registry = app.metrics.registry
        assert registry.get_sample_value("charai_exchange_commands_sum", {"kind": "create"}) == 50
        assert registry.get_sample_value("charai_exchange_commands_count", {"kind": "create"}) == (
            client.coalescer.calls
        )
        claims = await asyncio.gather(*(client.claim_task(t.id, 1, "w1") for t in tasks))
        assert [c.outcome for c in claims] == [RUN] * 50
        assert [c.task.id for c in claims] == [t.id for t in tasks]  # answers in order
        done = await asyncio.gather(*(client.complete_task(t.id, 1, image_result()) for t in tasks))
        assert {t.status for t in done} == {COMPLETED}
        assert client.coalescer.calls <= 6


async def test_a_refused_command_fails_alone_with_its_unary_error(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with coalescing(app_settings(nats_server, tmp_path, db)) as (_, client):
        a, b = await asyncio.gather(
            client.create_task("acme", image_request()), client.create_task("acme", tts_request())
        )
        await asyncio.gather(client.claim_task(a.id, 1, "w1"), client.claim_task(b.id, 1, "w1"))
        results = await asyncio.gather(
            client.report_progress(a.id, 1, 50, "generating"),
            client.report_progress(b.id, 7, 50, "generating"),  # not b's attempt
            client.create_task("acme", image_request(prompt="")),  # invalid
            return_exceptions=True,
        )
        assert results[0] == 2  # TASK_STATUS_RUNNING
        stale = results[1]
        assert isinstance(stale, grpc.aio.AioRpcError)
        assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no longer holds it" in (stale.details() or "")
        assert error_details(stale).reason == "STALE_ATTEMPT"
        invalid = results[2]
        assert isinstance(invalid, grpc.aio.AioRpcError)
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(invalid).field_violations] == ["image.prompt"]
        listed = await client.list_tasks("acme", task_service_pb2.ListTasksRequest(page_size=100))
        assert len(listed.tasks) == 2  # the invalid create stored nothing


async def test_the_creates_of_one_call_are_answered_each_as_its_own_create(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # One tenant's creates in one Exchange share a transaction (create_each); every answer is
    # still the one its CreateTask would give, in order, and the refused ones store nothing.
    async with (
        coalescing(app_settings(nats_server, tmp_path, db)) as (app, client),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        taken = await client.create_task("acme", tts_request(request_id="taken"))
        requests = [
            ("acme", image_request(request_id="r1")),
            ("acme", image_request(prompt="")),  # invalid
            ("other", image_request(request_id="r1")),  # another tenant's r1: its own task
            ("acme", image_request(request_id="r1")),  # the first's task again
            ("acme", image_request(request_id="taken")),  # r1 of another type
            ("acme", tts_request()),
        ]
        commands = [
            spb.StoreCommand(create=spb.CreateTaskRequest(tenant=tenant, request=request))
            for tenant, request in requests
        ]
        stub = spb_grpc.TaskStoreServiceStub(channel)
        answers = (await stub.Exchange(spb.ExchangeRequest(commands=commands))).answers
        kinds = [a.WhichOneof("answer") for a in answers]
        assert kinds == ["create", "error", "create", "create", "error", "create"]
        first, _, other, again, _, voice = (a.create.task for a in answers)
        assert again.id == first.id and other.id != first.id
        assert voice.type == TTS and voice.queue_position >= 1
        assert refusal(answers[1].error) == (grpc.StatusCode.INVALID_ARGUMENT, ["image.prompt"])
        assert refusal(answers[4].error) == (grpc.StatusCode.INVALID_ARGUMENT, ["request_id"])
        listed = await client.list_tasks("acme", task_service_pb2.ListTasksRequest(page_size=100))
        assert {t.id for t in listed.tasks} == {taken.id, first.id, voice.id}
        for task in (first, voice):
            page = await client.list_events(spb.ListEventsRequest(tenant="acme", task_id=task.id))
            assert [e.type for e in page.events] == [EV.TASK_EVENT_TYPE_QUEUED]


async def test_a_workers_commands_in_one_call_are_answered_each_as_its_own_rpc(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # A worker's claims, reports and outcomes in one Exchange share a transaction (worker_each);
    # each answer is still the one its unary RPC gives, in order, a refusal is its alone, and
    # one task's report and completion land in the order sent.
    async with (
        coalescing(app_settings(nats_server, tmp_path, db, dispatch_buffer=100)) as (app, client),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        a, b, c = await asyncio.gather(*(client.create_task("acme", image_request()) for _ in range(3)))
        await asyncio.gather(client.claim_task(a.id, 1, "w1"), client.claim_task(b.id, 1, "w1"))
        commands = [
            spb.StoreCommand(claim=spb.ClaimTaskRequest(task_id=c.id, dispatch_gen=1, worker_id="w2")),
            spb.StoreCommand(progress=spb.ReportProgressRequest(task_id=a.id, attempt=1, progress=90)),
            spb.StoreCommand(complete=complete_req(a.id, 1)),
            spb.StoreCommand(complete=complete_req(b.id, 3)),  # not b's attempt
            spb.StoreCommand(fail=fail_req(b.id, 1, ErrorKind.PROVIDER_TIMEOUT)),
        ]
        stub = spb_grpc.TaskStoreServiceStub(channel)
        answers = (await stub.Exchange(spb.ExchangeRequest(commands=commands))).answers
        kinds = [x.WhichOneof("answer") for x in answers]
        assert kinds == ["claim", "progress", "complete", "error", "fail"]
        claim, report, done, stale, failed = answers
        assert (claim.claim.outcome, claim.claim.task.id, claim.claim.attempt) == (RUN, c.id, 1)
        assert claim.claim.lease_seconds > 0
        assert report.progress.status == RUNNING
        assert (done.complete.task.status, done.complete.task.progress) == (COMPLETED, 100)
        assert refusal(stale.error) == (grpc.StatusCode.FAILED_PRECONDITION, [])
        assert error_details(answer_error(stale.error)).reason == "STALE_ATTEMPT"
        assert (failed.fail.outcome, failed.fail.task.status) == (spb.FAIL_OUTCOME_RETRY, QUEUED)
        page = await client.list_events(spb.ListEventsRequest(tenant="acme", task_id=a.id))
        assert [e.type for e in page.events][-2:] == [
            EV.TASK_EVENT_TYPE_PROGRESS,
            EV.TASK_EVENT_TYPE_COMPLETED,
        ]


async def test_a_failed_transaction_answers_each_grouped_command_and_logs_once(
    nats_server: NatsServer, tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The transaction of a call's creates fails as a whole (here: its store call raises): every
    # create is answered INTERNAL without details, and the traceback is logged once, not per create.
    async def broken(*_: object) -> list[object]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(TaskStore, "create_each", broken)
    async with (
        coalescing(app_settings(nats_server, tmp_path, db)) as (app, _),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = spb_grpc.TaskStoreServiceStub(channel)
        command = spb.StoreCommand(create=spb.CreateTaskRequest(tenant="acme", request=image_request()))
        with capture_logs() as lines:
            answers = (await stub.Exchange(spb.ExchangeRequest(commands=[command] * 3))).answers
        assert [refusal(a.error) for a in answers] == [(grpc.StatusCode.INTERNAL, [])] * 3
        assert all("disk on fire" not in (answer_error(a.error).details() or "") for a in answers)
        assert [line["event"] for line in lines].count("exchange_command_failed") == 1


async def test_a_lone_command_leaves_the_calls_trace_and_log_context_as_it_found_them(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    # A call's only command runs in the call's own task (no task of its own): its trace and log
    # context are its own while it runs, and the call's canonical log line still has the call's.
    call_trace = f"00-{'a' * 32}-{'b' * 16}-01"
    command_trace = f"00-{'c' * 32}-{'d' * 16}-01"
    async with (
        coalescing(app_settings(nats_server, tmp_path, db)) as (app, _),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = spb_grpc.TaskStoreServiceStub(channel)
        create = spb.CreateTaskRequest(tenant="acme", request=image_request())
        command = spb.StoreCommand(create=create, traceparent=command_trace)
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
            answer = (
                await stub.Exchange(
                    spb.ExchangeRequest(commands=[command]), metadata=(("traceparent", call_trace),)
                )
            ).answers[0]
        assert answer.create.task.id
        by_event = {line["event"]: line for line in lines}
        assert by_event["command_finished"]["command"] == "CreateTask"
        assert by_event["command_finished"]["trace_id"] == "c" * 32
        assert by_event["rpc_finished"]["rpc"] == "Exchange"
        assert by_event["rpc_finished"]["trace_id"] == "a" * 32
        assert "command" not in by_event["rpc_finished"]


async def test_exchange_refuses_too_many_commands(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with (
        coalescing(app_settings(nats_server, tmp_path, db)) as (app, _),
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = spb_grpc.TaskStoreServiceStub(channel)
        command = spb.StoreCommand(claim=spb.ClaimTaskRequest(task_id="task_x", dispatch_gen=1))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Exchange(spb.ExchangeRequest(commands=[command] * (MAX_EXCHANGE + 1)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(refused.value).field_violations] == ["commands"]


async def test_a_task_store_without_exchange_gets_unary_calls(
    nats_server: NatsServer, tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older task_store (rolling upgrade): the generated base answers UNIMPLEMENTED.
    monkeypatch.setattr(TaskStoreServicer, "Exchange", spb_grpc.TaskStoreServiceServicer.Exchange)
    monkeypatch.setattr(TaskStoreServicer, "ExchangeStream", spb_grpc.TaskStoreServiceServicer.ExchangeStream)
    async with coalescing(app_settings(nats_server, tmp_path, db), stream=True) as (_, client):
        tasks = await asyncio.gather(*(client.create_task("acme", image_request()) for _ in range(5)))
        assert len({t.id for t in tasks}) == 5
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await client.report_progress(tasks[0].id, 3, 50, "generating")
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        claim = await client.claim_task(tasks[0].id, 1, "w1")
        assert claim.outcome == RUN


async def test_a_task_store_without_exchange_stream_gets_unary_exchange_calls(
    nats_server: NatsServer, tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The release before ExchangeStream: Exchange calls, still batched.
    monkeypatch.setattr(TaskStoreServicer, "ExchangeStream", spb_grpc.TaskStoreServiceServicer.ExchangeStream)
    async with coalescing(app_settings(nats_server, tmp_path, db), stream=True) as (_, client):
        tasks = await asyncio.gather(*(client.create_task("acme", image_request()) for _ in range(5)))
        assert len({t.id for t in tasks}) == 5
        assert client.coalescer is not None and client.coalescer.calls < 5
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await client.report_progress(tasks[0].id, 3, 50, "generating")
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_claim_asked_again_after_a_lost_answer_gets_the_same_attempt(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with coalescing(app_settings(nats_server, tmp_path, db)) as (_, client):
        task = await client.create_task("acme", image_request())
        first = await client.claim_task(task.id, 1, "w1")
        # The answer of `first` was lost: w1 asks again and runs the attempt the store gave it.
        again = await client.claim_task(task.id, 1, "w1", again=True)
        assert (again.outcome, again.attempt) == (RUN, first.attempt)
        # A plain redelivery (the worker may have run it) and another worker still wait.
        assert (await client.claim_task(task.id, 1, "w1")).outcome == DEFER
        assert (await client.claim_task(task.id, 1, "w2", again=True)).outcome == DEFER
        page = await client.list_events(spb.ListEventsRequest(tenant="acme", task_id=task.id))
        assert [e.type for e in page.events].count(EV.TASK_EVENT_TYPE_STARTED) == 1


async def test_batch_creates_travel_in_exchange_and_stay_all_or_none(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with coalescing(app_settings(nats_server, tmp_path, db)) as (app, client):
        sheet = [image_request(view_type=v) for v in ("front", "side", "back")] + [tts_request()]
        bad = [image_request(), image_request(prompt="")]
        made, refused, single = await asyncio.gather(
            client.batch_create_tasks("acme", sheet),
            client.batch_create_tasks("acme", bad),
            client.create_task("acme", tts_request()),
            return_exceptions=True,
        )
        assert isinstance(made, list) and [t.image.view_type for t in made[:3]] == ["front", "side", "back"]
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(refused).field_violations] == ["requests[1].image.prompt"]
        assert not isinstance(single, BaseException)
        listed = await client.list_tasks("acme", task_service_pb2.ListTasksRequest(page_size=100))
        assert len(listed.tasks) == 5  # the sheet and the single create; nothing of the bad batch
        registry = app.metrics.registry
        assert registry.get_sample_value("charai_exchange_commands_count", {"kind": "batch_create"}) == 1


async def hooked_and_done(client: StoreClient, n: int) -> list[str]:
    """``n`` image tasks with a webhook for their completion, run to completion: their
    deliveries' ids (each the head of its task's deliveries, so due at once)."""
    ids = []
    for _ in range(n):
        request = image_request()
        request.webhook.CopyFrom(task_pb2.Webhook(url="https://hooks.example.com/in", events=["completed"]))
        task = await client.create_task("acme", request)
        claim = await client.claim_task(task.id, 1, "w1")
        await client.complete_task(task.id, claim.attempt, image_result())
        page = await client.list_webhook_deliveries(
            "acme", task_service_pb2.ListWebhookDeliveriesRequest(task_id=task.id)
        )
        ids += [d.id for d in page.deliveries]
    return ids


def settled(delivery_id: str, sender_id: str, status: int) -> spb.SettleWebhookDeliveryRequest:
    return spb.SettleWebhookDeliveryRequest(delivery_id=delivery_id, sender_id=sender_id, http_status=status)


async def test_a_senders_claims_and_settlements_travel_in_exchange_each_as_its_unary_rpc(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    async with coalescing(app_settings(nats_server, tmp_path, db), stream=True) as (app, client):
        ids = await hooked_and_done(client, 4)
        assert client.coalescer is not None
        calls = client.coalescer.calls
        claims = await asyncio.gather(*(client.claim_webhook_delivery(i, "s1") for i in ids))
        assert client.coalescer.calls - calls < len(ids)  # shared calls
        assert [(c.outcome, c.attempt, c.url) for c in claims] == [
            (RUN, 1, "https://hooks.example.com/in")
        ] * 4
        assert [c.event_type for c in claims] == ["task.completed"] * 4 and all(c.secrets for c in claims)
        # Claimed by s1: another sender is told to wait, through Exchange as by the unary RPC.
        stub = spb_grpc.TaskStoreServiceStub(client._channel)
        other = spb.ClaimWebhookDeliveryRequest(delivery_id=ids[0], sender_id="s2")
        for answer in (
            await stub.ClaimWebhookDelivery(other),
            await client.claim_webhook_delivery(ids[0], "s2"),
        ):
            assert answer.outcome == spb.CLAIM_OUTCOME_DEFER and 0 < answer.retry_after_seconds <= 60
        statuses = [200, 200, 503, 200]
        answers = await asyncio.gather(
            *(
                client.settle_webhook_delivery(settled(i, "s1", s))
                for i, s in zip(ids, statuses, strict=True)
            ),
            client.settle_webhook_delivery(settled(ids[0], "s2", 200)),  # not its claim: changes nothing
        )
        assert [a.outcome for a in answers] == [DONE, DONE, RETRY, DONE, DONE]
        assert answers[2].retry_after_seconds > 0
        page = await client.list_webhook_deliveries("acme", task_service_pb2.ListWebhookDeliveriesRequest())
        found = {d.id: ([a.http_status for a in d.attempts], d.status) for d in page.deliveries}
        assert found == {
            ids[0]: ([200], DELIVERED),
            ids[1]: ([200], DELIVERED),
            ids[2]: ([503], PENDING),
            ids[3]: ([200], DELIVERED),
        }
        registry = app.metrics.registry
        assert registry.get_sample_value("charai_exchange_commands_count", {"kind": "webhook_claim"})
        assert registry.get_sample_value("charai_exchange_commands_count", {"kind": "webhook_settle"})


async def test_a_task_store_without_a_kind_of_command_gets_unary_calls_for_it(
    nats_server: NatsServer, tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task_store older than the commands (rolling upgrade) drops them as unknown fields and
    # finds an empty command, which it refuses.
    decide = TaskStoreServicer._decide

    async def older(
        self: TaskStoreServicer, command: spb.StoreCommand, kind: str | None, context: Any
    ) -> spb.StoreAnswer:
        return await decide(self, command, None if kind and kind.startswith("webhook_") else kind, context)

    async with coalescing(app_settings(nats_server, tmp_path, db), stream=True) as (_, client):
        ids = await hooked_and_done(client, 2)
        monkeypatch.setattr(TaskStoreServicer, "_decide", older)
        assert client.coalescer is not None
        claims = await asyncio.gather(*(client.claim_webhook_delivery(i, "s1") for i in ids))
        assert [c.outcome for c in claims] == [RUN, RUN]
        calls = client.coalescer.calls
        again = await client.claim_webhook_delivery(ids[0], "s1")  # its own claim: answered again
        assert again.outcome == RUN and client.coalescer.calls == calls  # unary from now on
        # Each kind of command learns it on its own: the first settle is refused in Exchange too.
        first = await client.settle_webhook_delivery(settled(ids[0], "s1", 200))
        calls = client.coalescer.calls
        answer = await client.settle_webhook_delivery(settled(ids[1], "s1", 200))
        assert answer.outcome == DONE and client.coalescer.calls == calls  # unary from now on
        assert first.outcome == DONE
