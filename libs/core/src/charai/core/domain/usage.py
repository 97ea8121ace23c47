"""Usage metering and budgets: what a provider call used, what a tenant spent in a period, and
whether a budget is reached. Pure: times are microseconds passed in, periods are UTC calendar
days and months, nothing here reads a clock or a database.

Why metered per attempt and recorded with the attempt's outcome: the provider charges for a call
that answered, whatever happens to the attempt afterwards (the media store may fail, the task may
be cancelled meanwhile). The worker reports what its calls used with CompleteTask or FailTask;
task_store prices it (:mod:`charai.core.domain.prices`) and writes it in the outcome's own
transaction, once per (task, attempt), so a repeated report never counts twice.

**Reuse hook.** A result reused from another execution (identical speech) cost nothing: report
:func:`reused` (``reused=True``, no units). task_store prices it 0 and GetUsage counts it under
``reused``, so reuse shows without touching spend or unit budgets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

from charai.core.tenants import Budget

US_PER_SECOND = 1_000_000
#: Costs are kept in whole micro-dollars, so sums over many calls are exact.
MICROS_PER_USD = 1_000_000
#: The longest day range one GetUsage may ask for.
MAX_RANGE_DAYS = 366
_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Metered:
    """What the paid provider calls of one attempt used (summed when an attempt makes several).

    Attributes:
        provider: The provider dialect (``zhipu``, ``openai``): the price table's first key.
        model: The model called: its second key.
        calls: Provider calls charged.
        images: Images generated (image models price each by ``image_size`` and ``image_quality``).
        image_size: ``WxH`` asked for.
        image_quality: ``standard``, ``hd``, ``low`` ...; empty for the model's default.
        speech_characters: Characters of text spoken.
        audio_seconds: Seconds of audio produced.
        reused: The result came from another execution: nothing was charged (see the module).
    """

    provider: str
    model: str
    calls: int = 0
    images: int = 0
    image_size: str = ""
    image_quality: str = ""
    speech_characters: int = 0
    audio_seconds: float = 0.0
    reused: bool = False

    @property
    def audio_us(self) -> int:
        """Audio in whole microseconds (how it is stored and summed)."""
        return round(self.audio_seconds * US_PER_SECOND)

    def __add__(self, other: Metered) -> Metered:
        """Both attempts' calls as one (the later call's provider, model, size and quality)."""
        return Metered(
            provider=other.provider or self.provider,
            model=other.model or self.model,
            calls=self.calls + other.calls,
            images=self.images + other.images,
            image_size=other.image_size or self.image_size,
            image_quality=other.image_quality or self.image_quality,
            speech_characters=self.speech_characters + other.speech_characters,
            audio_seconds=self.audio_seconds + other.audio_seconds,
            reused=self.reused and other.reused,
        )


def image_call(provider: str, model: str, size: str, quality: str = "", images: int = 1) -> Metered:
    """One charged image generation call that delivered ``images`` pictures."""
    return Metered(provider, model, calls=1, images=images, image_size=size, image_quality=quality)


def speech_call(provider: str, model: str, text: str, audio_seconds: float) -> Metered:
    """One charged speech call: the characters of ``text`` sent, ``audio_seconds`` produced."""
    return Metered(
        provider, model, calls=1, speech_characters=len(text), audio_seconds=max(0.0, audio_seconds)
    )


def reused(provider: str, model: str) -> Metered:
    """A result taken from another execution instead of a provider call: zero cost."""
    return Metered(provider, model, reused=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """A tenant's usage summed over a period (what budgets are checked against)."""

    calls: int = 0
    images: int = 0
    speech_characters: int = 0
    audio_us: int = 0
    cost_micros: int = 0

    def amount(self, unit: str) -> float:
        """The total in a budget's ``unit`` (``usd`` from the recorded costs)."""
        if unit == "usd":
            return self.cost_micros / MICROS_PER_USD
        if unit == "images":
            return float(self.images)
        if unit == "speech_characters":
            return float(self.speech_characters)
        if unit == "audio_seconds":
            return self.audio_us / US_PER_SECOND
        raise ValueError(f"unknown budget unit {unit!r}")


# -- periods (UTC) -----------------------------------------------------------------------------
def _at(now_us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=now_us)


def _us(moment: dt.datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def day_of(now_us: int) -> str:
    """The UTC day of a time, ``YYYY-MM-DD`` (how usage is grouped)."""
    return _at(now_us).date().isoformat()


def period_window(period: str, now_us: int) -> tuple[int, int]:
    """The UTC calendar ``day`` or ``month`` holding ``now_us``: [start, end) in microseconds."""
    moment = _at(now_us)
    if period == "day":
        start = dt.datetime(moment.year, moment.month, moment.day, tzinfo=_UTC)
        return _us(start), _us(start + dt.timedelta(days=1))
    if period == "month":
        start = dt.datetime(moment.year, moment.month, 1, tzinfo=_UTC)
        following = dt.datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=_UTC)
        return _us(start), _us(following)
    raise ValueError(f"unknown budget period {period!r}")


def day_window(first: str, last: str) -> tuple[int, int]:
    """[start of ``first``, end of ``last``) in microseconds, for days ``YYYY-MM-DD``."""
    start = dt.datetime.combine(dt.date.fromisoformat(first), dt.time(), _UTC)
    end = dt.datetime.combine(dt.date.fromisoformat(last), dt.time(), _UTC) + dt.timedelta(days=1)
    return _us(start), _us(end)


class DayRangeError(ValueError):
    """A GetUsage day range that cannot be served; ``field`` names the request field."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def _parse_day(field: str, value: str) -> dt.date:
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise DayRangeError(field, f"must be a day YYYY-MM-DD (UTC), not {value[:20]!r}") from None


def day_range(start_day: str, end_day: str, now_us: int) -> tuple[str, str]:
    """The days GetUsage reports, inclusive: as asked, or from the first of the current month
    (``start_day`` empty) to today (``end_day`` empty); raises :class:`DayRangeError`."""
    today = _at(now_us).date()
    first = _parse_day("start_day", start_day) if start_day else today.replace(day=1)
    last = _parse_day("end_day", end_day) if end_day else today
    if first > last:
        raise DayRangeError("end_day", f"must not be before start_day ({first.isoformat()})")
    if (last - first).days >= MAX_RANGE_DAYS:
        raise DayRangeError("end_day", f"the range may span at most {MAX_RANGE_DAYS} days")
    return first.isoformat(), last.isoformat()


# -- budgets -----------------------------------------------------------------------------------
def format_amount(unit: str, value: float) -> str:
    """How an error or a table writes an amount: money with cents (and the micro-dollars below a
    cent when there are any: a budget of 0.005 is not written 0.01), counts whole, seconds to 0.1."""
    if unit == "usd":
        whole, _, cents = f"{value:.6f}".rstrip("0").partition(".")
        return f"{whole}.{cents.ljust(2, '0')}"
    if unit == "audio_seconds":
        return f"{value:.1f}"
    return f"{value:.0f}"


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetReached:
    """A budget the tenant's spend in the current period has reached: creates are refused
    until ``period_end_us`` (the next UTC day or month)."""

    tenant: str
    budget: Budget
    spent: float
    period_end_us: int

    @property
    def description(self) -> str:
        """E.g. ``day/usd budget 5.00 reached (5.02 spent)``: QuotaFailure's description."""
        unit = self.budget.unit
        limit, spent = format_amount(unit, self.budget.limit), format_amount(unit, self.spent)
        return f"{self.budget.name} budget {limit} reached ({spent} spent)"

    def retry_after(self, now_us: int) -> float:
        """Seconds until the period ends (a new period, a fresh budget)."""
        return max(0.0, (self.period_end_us - now_us) / US_PER_SECOND)


def periods(budgets: Sequence[Budget]) -> tuple[str, ...]:
    """The distinct periods ``budgets`` are counted over (one total per period is enough)."""
    return tuple(dict.fromkeys(b.period for b in budgets))


def first_reached(
    tenant: str, budgets: Sequence[Budget], totals: Mapping[str, Totals], now_us: int
) -> BudgetReached | None:
    """The first of ``budgets`` whose period's total (``totals[period]``) has reached its limit,
    or None. Reached means spent >= limit: a limit of 0 refuses every create. A task already
    accepted is never stopped by this; it is asked only when a task is created."""
    for budget in budgets:
        spent = totals.get(budget.period, Totals()).amount(budget.unit)
        if spent >= budget.limit:
            return BudgetReached(tenant, budget, spent, period_window(budget.period, now_us)[1])
    return None
