"""Usage metering and budgets in task_store, on both backends (a SQLite file and a real
PostgreSQL database): an attempt's usage is written with its outcome, once however often the
outcome is repeated, also when the outcome itself is refused or ignored (the provider was paid);
a tenant whose spend reached a budget is refused at create (RESOURCE_EXHAUSTED with a
QuotaFailure naming the budget; nothing stored), through the unary RPCs and the batched
Exchange; a running task is never cut off; the next period starts afresh (the store's clock).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from charai.core.clock import ManualClock
from charai.core.domain import usage as rules
from charai.core.domain.errors import ErrorKind
from charai.core.domain.prices import PriceTable
from charai.core.errors import StaleAttemptError, TaskEndedError
from charai.core.grpcsupport import status_for
from charai.core.storeclient import StoreClient
from charai.core.tenants import parse_tenants
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.task_store.usage import BudgetExceededError, UsageConfig
from charai.taskapi import error_details
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.integration.conftest import Database, Recorded, opened
from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    EV,
    RUN,
    RUNNING,
    image_request,
    image_result,
    tts_request,
)
from tests.integration.test_task_store_api import app_settings

if TYPE_CHECKING:
    from tests.conftest import NatsServer

GLM_IMAGE_MICROS = PriceTable().cost_micros(rules.image_call("zhipu", "glm-image", "1024x1024"))


def speech(chars: int, seconds: float) -> task_pb2.Usage:
    return task_pb2.Usage(
        provider="zhipu", model="glm-tts", calls=1, speech_characters=chars, audio_seconds=seconds
    )


def picture() -> task_pb2.Usage:
    return task_pb2.Usage(provider="zhipu", model="glm-image", calls=1, images=1, image_size="1024x1024")


def completed(task_id: str, attempt: int, used: task_pb2.Usage | None) -> spb.CompleteTaskRequest:
    request = spb.CompleteTaskRequest(task_id=task_id, attempt=attempt, image_result=image_result())
    if used is not None:
        request.usage.CopyFrom(used)
    return request


def failed(task_id: str, attempt: int, used: task_pb2.Usage, kind: ErrorKind) -> spb.FailTaskRequest:
    error = task_pb2.TaskError(code=int(kind), message="media store away")  # type: ignore[arg-type]
    return spb.FailTaskRequest(task_id=task_id, attempt=attempt, error=error, usage=used)


async def tts_completed(rec: Recorded, task_id: str, attempt: int, used: task_pb2.Usage) -> task_pb2.Task:
    request = spb.CompleteTaskRequest(
        task_id=task_id, attempt=attempt, tts_result=task_pb2.TtsResult(audio_url="charai-media:a.wav")
    )
    request.usage.CopyFrom(used)
    return await rec.store.complete(request)


async def test_usage_is_recorded_once_per_attempt_with_its_outcome(db: Database, rec: Recorded) -> None:
    store, clock = rec.store, rec.clock
    task, _ = await store.create("t1", tts_request())
    assert (await store.claim(task.id, 1, "w")).attempt == 1
    # Attempt 1 paid for 5 characters, then failed (its media store was away): a retry.
    away = failed(task.id, 1, speech(5, 1.5), ErrorKind.PROVIDER_UNAVAILABLE)
    outcome, delay, after = await store.fail(away)
    assert outcome == spb.FAIL_OUTCOME_RETRY
    assert (after.usage.calls, after.usage.speech_characters, after.usage.audio_seconds) == (1, 5, 1.5)
    again = await store.fail(away)  # its answer was lost
    assert again[0] == spb.FAIL_OUTCOME_IGNORED
    assert await db.count_rows("usage_records") == 1
    clock.advance(delay)
    assert (await store.claim(task.id, 1, "w")).attempt == 2
    done = await tts_completed(rec, task.id, 2, speech(5, 1.25))
    assert done.status == COMPLETED
    expected = (2, 10, 2.75, 2 * 75 / 1e6)  # glm-tts: $15 per million characters
    usage = done.usage
    assert (usage.calls, usage.speech_characters, usage.audio_seconds, usage.cost_usd) == expected
    repeated = await tts_completed(rec, task.id, 2, speech(5, 1.25))  # its acknowledgement was lost
    assert (repeated.usage.calls, repeated.usage.speech_characters) == (2, 10)
    assert await db.count_rows("usage_records") == 2
    # The task and its events carry the total; the COMPLETED event's snapshot already has it.
    assert (await store.get("t1", task.id)).usage == done.usage
    events = await rec.events(task.id)
    completion = next(e for e in events if e.type == EV.TASK_EVENT_TYPE_COMPLETED)
    assert completion.task.usage == done.usage
    retry = next(e for e in events if e.type == EV.TASK_EVENT_TYPE_RETRY_SCHEDULED)
    assert retry.task.usage.calls == 1

    report = await store.get_usage("t1", task_service_pb2.GetUsageRequest())
    assert [(r.tenant, r.provider, r.model, r.day) for r in report.rows] == [
        ("t1", "zhipu", "glm-tts", rules.day_of(clock.now_us()))
    ]
    row = report.rows[0]
    assert (row.calls, row.speech_characters, row.audio_seconds, row.cost_usd, row.reused) == (*expected, 0)
    assert list(report.budgets) == []  # t1 has none
    assert list((await store.get_usage("t2", task_service_pb2.GetUsageRequest())).rows) == []


async def test_a_paid_call_counts_even_when_its_outcome_is_refused_or_ignored(db: Database) -> None:
    async with opened(db, lease_seconds=0.5) as rec:
        store, clock = rec.store, rec.clock
        # Cancelled while the provider call ran: the result is refused, the usage is recorded.
        cancelled, _ = await store.create("t1", image_request())
        await store.claim(cancelled.id, 1, "w")
        await store.cancel("t1", cancelled.id)
        with pytest.raises(TaskEndedError):
            await store.complete(completed(cancelled.id, 1, picture()))
        with pytest.raises(TaskEndedError):
            await store.complete(completed(cancelled.id, 1, picture()))  # repeated: still once
        shown = await store.get("t1", cancelled.id)
        assert (shown.status, shown.usage.images) == (CANCELLED, 1)
        assert shown.usage.cost_usd == GLM_IMAGE_MICROS / 1e6
        # A result refused without usage changes nothing (and stays refused).
        with pytest.raises(TaskEndedError):
            await store.complete(completed(cancelled.id, 1, None))

        # An attempt that lost its lease: its result is stale, its failure ignored, its calls paid.
        task, _ = await store.create("t1", image_request())
        await store.claim(task.id, 1, "worker-a")
        clock.advance(0.6)
        assert (await store.claim(task.id, 1, "worker-b")).attempt == 2
        with pytest.raises(StaleAttemptError):
            await store.complete(completed(task.id, 1, picture()))
        outcome, _, _ = await store.fail(failed(task.id, 1, picture(), ErrorKind.INTERNAL))
        assert outcome == spb.FAIL_OUTCOME_IGNORED
        assert (await store.get("t1", task.id)).status == RUNNING
        done = await store.complete(completed(task.id, 2, picture()))
        assert (done.status, done.usage.calls, done.usage.images) == (COMPLETED, 2, 2)
        assert await db.count_rows("usage_records") == 3  # (cancelled, 1), (task, 1), (task, 2)
        report = await store.get_usage("t1", task_service_pb2.GetUsageRequest())
        assert [(r.model, r.calls, r.images) for r in report.rows] == [("glm-image", 3, 3)]
        assert report.rows[0].cost_usd == pytest.approx(3 * GLM_IMAGE_MICROS / 1e6, abs=1e-9)


def budget_error(exc: BudgetExceededError) -> tuple[int, list[tuple[str, str]], dict[str, str]]:
    status = status_for(exc)
    assert status is not None
    return code_and_quota(status)


def code_and_quota(status: status_pb2.Status) -> tuple[int, list[tuple[str, str]], dict[str, str]]:
    violations: list[tuple[str, str]] = []
    info: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            violations += [(v.subject, v.description) for v in quota.violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            info = {"reason": error_info.reason, **error_info.metadata}
    return status.code, violations, info


async def stored(db: Database) -> list[int]:
    return [await db.count_rows(table) for table in ("tasks", "events", "outbox")]


async def test_a_tenant_over_budget_is_refused_at_create_until_the_period_ends(db: Database) -> None:
    tenants = parse_tenants(
        """
        [tenants.acme]
        budgets = [{ period = "day", limit = 0.02, unit = "usd" }]
        """
    )
    async with opened(db, usage=UsageConfig(tenants, PriceTable())) as rec:
        store, clock = rec.store, rec.clock
        first, _ = await store.create("acme", image_request(request_id="r1"))
        second, _ = await store.create("acme", image_request())
        third, _ = await store.create("acme", image_request())
        for task in (first, second, third):
            assert (await store.claim(task.id, 1, "w")).outcome == RUN
        await store.complete(completed(first.id, 1, picture()))
        await store.complete(completed(second.id, 1, picture()))  # 0.030 spent of 0.02
        before = await stored(db)
        with pytest.raises(BudgetExceededError) as err:
            await store.create("acme", image_request())
        code, violations, info = budget_error(err.value)
        assert code == code_pb2.RESOURCE_EXHAUSTED
        assert violations == [("tenant:acme", "day/usd budget 0.02 reached (0.03 spent)")]
        assert info == {"reason": "LIMIT_EXCEEDED", "limit": "budget", "budget": "day/usd"} | {
            "retry_after_seconds": info["retry_after_seconds"]
        }
        with pytest.raises(BudgetExceededError):
            await store.create_many("acme", [tts_request(), image_request()])
        assert await stored(db) == before  # nothing stored
        # A retried create of an accepted task still answers that task.
        again, created = await store.create("acme", image_request(request_id="r1"))
        assert (again.id, created) == (first.id, False)
        # A task already running is never cut off: it completes, and its usage counts.
        done = await store.complete(completed(third.id, 1, picture()))
        assert done.status == COMPLETED
        report = await store.get_usage("acme", task_service_pb2.GetUsageRequest())
        [budget] = report.budgets
        end = rules.period_window("day", clock.now_us())[1]
        assert (budget.period, budget.unit, budget.limit, budget.reached) == ("day", "usd", 0.02, True)
        assert budget.spent == pytest.approx(3 * GLM_IMAGE_MICROS / 1e6)
        assert budget.period_end_time.ToMicroseconds() == end
        # Other tenants are not concerned.
        await store.create("beta", image_request())

        # The next UTC day starts afresh.
        clock.advance((end - clock.now_us()) / 1e6)
        fresh, created = await store.create("acme", image_request())
        assert created and fresh.status == task_pb2.TASK_STATUS_QUEUED
        [budget] = (await store.get_usage("acme", task_service_pb2.GetUsageRequest())).budgets
        assert (budget.spent, budget.reached) == (0.0, False)


@contextlib.asynccontextmanager
async def coalescing(settings: Any) -> AsyncIterator[tuple[TaskStoreApp, StoreClient]]:
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}", coalesce=True) as client,
    ):
        yield app, client


def rpc_quota(exc: grpc.aio.AioRpcError) -> tuple[int, list[tuple[str, str]], dict[str, str]]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "RESOURCE_EXHAUSTED without a google.rpc.Status"
    return code_and_quota(status)


async def test_budget_refusals_travel_through_the_batched_exchange(
    nats_server: NatsServer, tmp_path: Path, db: Database
) -> None:
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text('[tenants.frozen]\nbudgets = [{period = "month", limit = 0, unit = "images"}]\n')
    settings = app_settings(nats_server, tmp_path, db, tenants_file=tenants_file)
    async with coalescing(settings) as (_, client):
        assert client.coalescer is not None
        for call in (
            lambda: client.create_task("frozen", image_request()),
            lambda: client.batch_create_tasks("frozen", [image_request(), tts_request()]),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _, violations, info = rpc_quota(err.value)
            assert violations == [("tenant:frozen", "month/images budget 0 reached (0 spent)")]
            assert (info["limit"], info["budget"]) == ("budget", "month/images")
            assert error_details(err.value).retry_after is not None  # until the month ends
            assert "CHARAI_TENANTS_FILE" in (err.value.details() or "")
        assert client.coalescer.commands >= 2  # both went through Exchange
        assert await stored(db) == [0, 0, 0]
        assert (await client.create_task("free", image_request())).status == task_pb2.TASK_STATUS_QUEUED

        report = await client.get_usage("frozen", task_service_pb2.GetUsageRequest())
        budgets = [(b.period, b.unit, b.limit, b.reached) for b in report.budgets]
        assert budgets == [("month", "images", 0, True)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get_usage("frozen", task_service_pb2.GetUsageRequest(start_day="2025-13-01"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(err.value).field_violations] == ["start_day"]


async def test_get_usage_groups_by_tenant_provider_model_and_day_a_page_at_a_time(db: Database) -> None:
    clock = ManualClock(start=rules.period_window("day", 1_800_000_000 * 10**6)[1] / 1e6 - 10, tick=1e-6)
    async with opened(db, clock=clock) as rec:
        store = rec.store

        async def one(tenant: str, used: task_pb2.Usage) -> None:
            task, _ = await store.create(tenant, tts_request() if used.speech_characters else image_request())
            await store.claim(task.id, 1, "w")
            if used.speech_characters:
                await tts_completed(rec, task.id, 1, used)
            else:
                await store.complete(completed(task.id, 1, used))

        first_day = rules.day_of(clock.now_us())
        await one("a", picture())
        await one("a", speech(4, 1.0))
        await one("b", picture())
        clock.advance(20)  # past midnight UTC
        second_day = rules.day_of(clock.now_us())
        await one("a", picture())
        await one("a", picture())
        everyone = await store.get_usage("", task_service_pb2.GetUsageRequest(start_day=first_day))
        assert [(r.day, r.tenant, r.model, r.calls) for r in everyone.rows] == [
            (first_day, "a", "glm-image", 1),
            (first_day, "a", "glm-tts", 1),
            (first_day, "b", "glm-image", 1),
            (second_day, "a", "glm-image", 2),
        ]
        assert (everyone.start_day, everyone.end_day, everyone.next_page_token) == (first_day, second_day, "")
        paged = task_service_pb2.GetUsageRequest(start_day=first_day, page_size=3)
        page = await store.get_usage("", paged)
        paged.page_token = page.next_page_token
        rest = await store.get_usage("", paged)
        assert list(page.rows) + list(rest.rows) == list(everyone.rows) and not rest.next_page_token
        only_a = await store.get_usage("a", task_service_pb2.GetUsageRequest(start_day=second_day))
        assert [(r.day, r.tenant, r.images) for r in only_a.rows] == [(second_day, "a", 2)]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (
            '[openai."dall-e-3"]\nper_image = "cheap"\n',
            'CHARAI_PRICES_FILE: openai."dall-e-3".per_image must be',
        ),
        (None, "CHARAI_PRICES_FILE: cannot read"),
    ],
)
async def test_a_bad_prices_file_stops_start_up_naming_the_setting(
    tmp_path: Path, content: str | None, named: str
) -> None:
    prices = tmp_path / "prices.toml"
    if content is not None:
        prices.write_text(content)
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'tasks.db'}", prices_file=prices
    )
    with pytest.raises(SystemExit) as err:
        async with TaskStoreApp(settings, listen_addr="127.0.0.1:0"):
            pass
    assert named in str(err.value)
    assert not (tmp_path / "tasks.db").exists()  # stopped before anything was opened


_RECORDS = "SELECT tenant, time, calls, images, speech_characters, audio_us, cost_micros FROM usage_records"
_TOTALS = (
    "SELECT tenant, period, start, calls, images, speech_characters, audio_us, cost_micros FROM usage_totals"
)


async def fetch(db: Database, sql: str) -> list[tuple[Any, ...]]:
    """Rows read from outside the store (its own connection), on either backend."""
    if db.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(db.url.removeprefix("sqlite:///"))) as lite:
            return [tuple(row) for row in lite.execute(sql).fetchall()]
    pg = await asyncpg.connect(db.url)
    try:
        return [tuple(row) for row in await pg.fetch(sql)]
    finally:
        await pg.close()


async def run(db: Database, *statements: str) -> None:
    if db.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(db.url.removeprefix("sqlite:///"))) as lite:
            for sql in statements:
                lite.execute(sql)
            lite.commit()
        return
    pg = await asyncpg.connect(db.url)
    try:
        for sql in statements:
            await pg.execute(sql)
    finally:
        await pg.close()


async def recorded_sums(db: Database) -> dict[tuple[str, str, int], tuple[int, ...]]:
    """``usage_records`` summed per tenant, period and period start, the periods' starts taken
    by the domain's rules (``period_window``), not by SQL."""
    sums: dict[tuple[str, str, int], tuple[int, ...]] = {}
    for tenant, time, *values in await fetch(db, _RECORDS):
        for period in ("day", "month"):
            key = (tenant, period, rules.period_window(period, int(time))[0])
            sums[key] = tuple(int(a) + int(b) for a, b in zip(sums.get(key, (0,) * 5), values, strict=True))
    return sums


async def usage_totals(db: Database) -> dict[tuple[str, str, int], tuple[int, ...]]:
    rows = await fetch(db, _TOTALS)
    return {
        (tenant, period, int(start)): tuple(int(v) for v in values) for tenant, period, start, *values in rows
    }


async def test_budgets_read_usage_totals_kept_per_day_and_month(db: Database) -> None:
    """A budget check reads the tenant's totals of the period (``usage_totals``, schema migration
    18, kept by a trigger), not every record of the period: the totals equal the records' sums
    over days and across a month's end, a database of schema 17 gets them summed from its
    records at the next start, and a check that reads them refuses a create even with the
    records gone behind its back."""
    tenants = parse_tenants('[tenants.acme]\nbudgets = [{ period = "month", limit = 0.02, unit = "usd" }]\n')
    config = UsageConfig(tenants, PriceTable())
    async with opened(db, usage=config) as rec:
        store, clock = rec.store, rec.clock
        now = clock.now_us()
        clock.advance((rules.period_window("month", now)[1] - now) / 1e6 - 7200)  # 2 h before a month ends
        for step in (0.0, 3 * 3600.0, 86_400.0):  # the month's last day, the next month's first two
            clock.advance(step)
            for tenant, used in (("acme", picture()), ("t2", speech(7, 1.5))):
                task, _ = await store.create(tenant, image_request())
                assert (await store.claim(task.id, 1, "w")).outcome == RUN
                await store.complete(completed(task.id, 1, used))
        await store.complete(completed(task.id, 1, used))  # its answer was lost: counted once
        totals = await usage_totals(db)
        assert totals == await recorded_sums(db)
        assert len(totals) == 2 * (3 + 2)  # per tenant: three days, two months
        with pytest.raises(BudgetExceededError):  # acme spent 0.03 of 0.02 this month
            await store.create("acme", image_request())
    # Back to schema 17: no totals, no trigger, and a record written meanwhile by an older release.
    undo = ("DROP TRIGGER usage_totals_add", "DROP TABLE usage_totals")
    if db.kind == "postgres":
        undo = ("DROP TRIGGER usage_totals_add ON usage_records", "DROP TABLE usage_totals")
    await run(
        db,
        *undo,
        "INSERT INTO usage_records SELECT 'older', 1, tenant, provider, model, day, time + 1, calls,"
        " images, image_size, image_quality, speech_characters, audio_us, cost_micros, reused"
        " FROM usage_records WHERE tenant = 't2' ORDER BY time LIMIT 1",
        "DELETE FROM schema_version WHERE version >= 18",
    )
    async with opened(db, rec.clock, usage=config) as rec:
        assert await usage_totals(db) == await recorded_sums(db)
        await run(db, "DELETE FROM usage_records WHERE tenant = 'acme'")
        with pytest.raises(BudgetExceededError):  # the month's total, not its records
            await rec.store.create("acme", image_request())
