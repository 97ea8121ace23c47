"""Usage records and budgets in the database (``usage_records``, schema migration 8).

The rules are pure (:mod:`charai.core.domain.usage`, :mod:`charai.core.domain.prices`); this
module is their SQL: record an attempt's metered calls in the transaction of its outcome (once
per task and attempt), refuse a create when the tenant's spend has reached a budget, and read the
usage back grouped by tenant, provider, model and day (GetUsage).

How a budget check learns what a tenant spent in a period: it reads the tenant's totals of the
UTC day or month (``usage_totals``), which a trigger on ``usage_records`` keeps (schema migration
18: :func:`charai.task_store.usage_schema.totals`, which says why it runs at commit on
PostgreSQL). Summing the period's records instead, in the create's transaction, grew with the
tenant's month: 37 ms a create at 100,000 records, and on SQLite every write behind it waited as
long.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

from charai.core.clock import Clock
from charai.core.domain import usage as rules
from charai.core.domain.prices import PriceTable
from charai.core.errors import LimitExceededError
from charai.core.tenants import Tenants
from charai.core.validation import MAX_INT64, RequestInvalidError, Violation
from charai.task_store.backend import Backend, Tx
from charai.task_store.usage_schema import TOTALLED
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
#: Longest provider or model name recorded (a worker's report is trusted, but not unbounded).
_MAX_NAME = 100
_SUMS = ", ".join(f"SUM({c})" for c in TOTALLED)


@dataclasses.dataclass(frozen=True, slots=True)
class UsageConfig:
    """Budgets per tenant (the tenants file) and the price table."""

    tenants: Tenants = dataclasses.field(default_factory=Tenants)
    prices: PriceTable = dataclasses.field(default_factory=PriceTable)


class BudgetExceededError(LimitExceededError):
    """RESOURCE_EXHAUSTED for a create while a budget is reached: ``ErrorInfo`` (reason
    ``LIMIT_EXCEEDED``, metadata ``limit=budget`` and ``budget=day/usd``), ``QuotaFailure``
    (subject ``tenant:<name>``, the budget in the description) and ``RetryInfo`` (until the
    period ends: waiting helps, the next day or month starts afresh)."""

    def __init__(self, reached: rules.BudgetReached, now_us: int) -> None:
        budget = reached.budget
        message = (
            f"tenant {reached.tenant}: {reached.description}; new tasks are refused until the"
            f" {budget.period} ends (UTC; budgets: CHARAI_TENANTS_FILE)"
        )
        wait = reached.retry_after(now_us)
        super().__init__(message, limit="budget", budget=budget.name, retry_after_seconds=f"{wait:.3f}")
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{reached.tenant}", description=reached.description
        )
        delay = duration_pb2.Duration(seconds=int(wait), nanos=int((wait - int(wait)) * 1e9))
        self.extra_details: list[Message] = [
            error_details_pb2.QuotaFailure(violations=[violation]),
            error_details_pb2.RetryInfo(retry_delay=delay),
        ]


def metered_of(report: task_pb2.Usage) -> rules.Metered:
    """A worker's report as the rules see it (negative figures read as 0)."""
    return rules.Metered(
        provider=report.provider[:_MAX_NAME],
        model=report.model[:_MAX_NAME],
        calls=max(0, report.calls),
        images=max(0, report.images),
        image_size=report.image_size[:_MAX_NAME],
        image_quality=report.image_quality[:_MAX_NAME],
        speech_characters=max(0, report.speech_characters),
        audio_seconds=max(0.0, report.audio_seconds),
        reused=report.reused,
    )


def add_to_task(task: task_pb2.Task, metered: rules.Metered, cost_micros: int) -> None:
    """Adds one attempt's usage to the task's running total (``Task.usage``)."""
    total = task.usage
    if task.HasField("usage"):
        before = metered_of(total)
        cost = round(total.cost_usd * rules.MICROS_PER_USD) + cost_micros
        metered = before + metered
    else:
        cost = cost_micros
    total.CopyFrom(
        task_pb2.Usage(
            provider=metered.provider,
            model=metered.model,
            calls=metered.calls,
            images=metered.images,
            image_size=metered.image_size,
            image_quality=metered.image_quality,
            speech_characters=metered.speech_characters,
            audio_seconds=metered.audio_us / rules.US_PER_SECOND,
            cost_usd=cost / rules.MICROS_PER_USD,
            reused=metered.reused,
        )
    )


class UsageLedger:
    """The usage rows: recorded with outcomes, summed for budgets, grouped for GetUsage."""

    def __init__(self, backend: Backend, clock: Clock, config: UsageConfig) -> None:
        self._db = backend
        self._clock = clock
        self._tenants = config.tenants
        self._prices = config.prices

    # -- writes (inside a command's transaction) ---------------------------------------------
    async def record(
        self, tx: Tx, tenant: str, task: task_pb2.Task, attempt: int, report: task_pb2.Usage, *, direct: bool
    ) -> bool:
        """Records ``report`` as the usage of ``attempt`` of ``task`` (priced now) and adds it to
        ``task.usage``; False, changing nothing, when that attempt's usage is already recorded.

        ``direct``: the command writes no event (a repeated or ignored report), so the task row
        is written here; otherwise the event about to be saved carries the new total.
        """
        metered = metered_of(report)
        now = self._clock.now_us()
        cost = self._prices.cost_micros(metered)
        inserted = await tx.execute(  # the count of rows inserted (no RETURNING row to step)
            "INSERT INTO usage_records (task_id, attempt, tenant, provider, model, day, time, calls,"
            " images, image_size, image_quality, speech_characters, audio_us, cost_micros, reused)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (task_id, attempt) DO NOTHING",
            task.id,
            attempt,
            tenant,
            metered.provider,
            metered.model,
            rules.day_of(now),
            now,
            metered.calls,
            metered.images,
            metered.image_size,
            metered.image_quality,
            metered.speech_characters,
            metered.audio_us,
            cost,
            int(metered.reused),
        )
        if not inserted:
            return False
        add_to_task(task, metered, cost)
        if direct:
            await tx.execute("UPDATE tasks SET task = ? WHERE id = ?", task.SerializeToString(), task.id)
        return True

    async def check_budgets(self, tx: Tx, tenant: str) -> None:
        """Raises :class:`BudgetExceededError` when ``tenant``'s spend in a current period has
        reached one of its budgets (nothing to read for a tenant without budgets)."""
        budgets = self._tenants.policy(tenant).budgets
        if not budgets:
            return
        now = self._clock.now_us()
        totals = {period: await self._totals(tx, tenant, period, now) for period in rules.periods(budgets)}
        reached = rules.first_reached(tenant, budgets, totals, now)
        if reached is not None:
            raise BudgetExceededError(reached, now)

    async def _totals(self, tx: Tx, tenant: str, period: str, now: int) -> rules.Totals:
        """What ``tenant`` used in the ``period`` (UTC day or month) holding ``now``: one row of
        ``usage_totals``, which a trigger adds each record to (schema migration 18)."""
        start, _ = rules.period_window(period, now)
        row = await tx.fetchrow(
            f"SELECT {', '.join(TOTALLED)} FROM usage_totals WHERE tenant = ? AND period = ? AND start = ?",
            tenant,
            period,
            start,
        )
        values = [int(v or 0) for v in (row or ())]
        return rules.Totals(*values) if values else rules.Totals()

    # -- GetUsage ----------------------------------------------------------------------------
    async def report(
        self, tenant: str, request: task_service_pb2.GetUsageRequest
    ) -> task_service_pb2.GetUsageResponse:
        """Rows grouped by tenant, provider, model and day over the request's days (every tenant
        when ``tenant`` is empty), a page at a time; and the budgets of a one-tenant query."""
        now = self._clock.now_us()
        try:
            first, last = rules.day_range(request.start_day, request.end_day, now)
        except rules.DayRangeError as exc:
            raise RequestInvalidError([Violation(exc.field, exc.description)]) from None
        size = _page_size(request.page_size)
        offset = _offset(request.page_token)

        async def body(tx: Tx) -> task_service_pb2.GetUsageResponse:
            response = task_service_pb2.GetUsageResponse(start_day=first, end_day=last)
            rows = await self._rows(tx, tenant, first, last, size + 1, offset)
            response.rows.extend(rows[:size])
            if len(rows) > size:
                response.next_page_token = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
            if tenant:
                response.budgets.extend(await self._budgets(tx, tenant, now))
            return response

        # Beside the write path: a report over many days groups many rows.
        return await self._db.read_aside(body)

    async def _rows(
        self, tx: Tx, tenant: str, first: str, last: str, limit: int, offset: int
    ) -> list[task_service_pb2.UsageRow]:
        start, end = rules.day_window(first, last)
        where = "time >= ? AND time < ?"
        args: list[object] = [start, end]
        if tenant:
            where, args = "tenant = ? AND " + where, [tenant, *args]
        found = await tx.fetch(
            f"SELECT tenant, provider, model, day, {_SUMS}, SUM(reused) FROM usage_records WHERE {where}"
            " GROUP BY tenant, provider, model, day ORDER BY day, tenant, provider, model LIMIT ? OFFSET ?",
            *args,
            limit,
            offset,
        )
        return [
            task_service_pb2.UsageRow(
                tenant=t,
                provider=provider,
                model=model,
                day=day,
                calls=int(calls),
                images=int(images),
                speech_characters=int(chars),
                audio_seconds=int(audio_us) / rules.US_PER_SECOND,
                cost_usd=int(cost) / rules.MICROS_PER_USD,
                reused=int(reused),
            )
            for t, provider, model, day, calls, images, chars, audio_us, cost, reused in found
        ]

    async def _budgets(self, tx: Tx, tenant: str, now: int) -> list[task_service_pb2.BudgetStatus]:
        budgets = self._tenants.policy(tenant).budgets
        totals = {period: await self._totals(tx, tenant, period, now) for period in rules.periods(budgets)}
        statuses = []
        for budget in budgets:
            spent = totals[budget.period].amount(budget.unit)
            status = task_service_pb2.BudgetStatus(
                tenant=tenant,
                period=budget.period,
                unit=budget.unit,
                limit=budget.limit,
                spent=spent,
                reached=spent >= budget.limit,
            )
            status.period_end_time.FromMicroseconds(rules.period_window(budget.period, now)[1])
            statuses.append(status)
        return statuses


def _page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise RequestInvalidError([Violation("page_size", f"must be 0 to {MAX_PAGE_SIZE}")])
    return value or DEFAULT_PAGE_SIZE


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        offset = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        offset = -1
    if not 0 <= offset <= MAX_INT64:
        raise RequestInvalidError([Violation("page_token", "is not a token GetUsage returned")])
    return offset
