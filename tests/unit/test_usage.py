"""Usage metering rules, the price table and budgets (charai.core.domain.usage / prices): pure,
no event loop; times are microseconds given by the test (UTC calendar boundaries)."""

from __future__ import annotations

import datetime as dt

import pytest
from charai.core.domain import usage
from charai.core.domain.prices import DEFAULT_PRICES, ModelPrice, PriceTable, parse_prices
from charai.core.domain.usage import Metered, Totals
from charai.core.tenants import Budget


def us(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Microseconds since the epoch of a UTC date and time."""
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()) * 1_000_000


# -- units -------------------------------------------------------------------------------------
def test_calls_meter_their_units_and_attempts_add_up() -> None:
    image = usage.image_call("openai", "dall-e-3", "1024x1792", "hd")
    assert (image.calls, image.images, image.image_size, image.image_quality) == (1, 1, "1024x1792", "hd")
    speech = usage.speech_call("zhipu", "glm-tts", "你好, world", 1.2345678)
    assert (speech.calls, speech.speech_characters, speech.audio_us) == (1, 9, 1_234_568)
    both = speech + usage.speech_call("zhipu", "glm-tts", "again", 0.5)
    assert (both.calls, both.speech_characters, both.audio_us, both.reused) == (2, 14, 1_734_568, False)
    reused = usage.reused("zhipu", "glm-tts")
    assert (reused.calls, reused.speech_characters, reused.reused) == (0, 0, True)
    assert not (reused + speech).reused  # one paid call among them: not a reuse
    assert usage.speech_call("zhipu", "glm-tts", "x", -1.0).audio_seconds == 0.0


# -- prices ------------------------------------------------------------------------------------
def test_default_prices_follow_the_public_examples() -> None:
    table = PriceTable()
    cost = table.cost_micros
    assert cost(usage.image_call("openai", "dall-e-3", "1024x1024")) == 40_000
    assert cost(usage.image_call("openai", "dall-e-3", "1024x1024", "standard")) == 40_000
    assert cost(usage.image_call("openai", "dall-e-3", "1024x1024", "hd")) == 80_000
    assert cost(usage.image_call("openai", "dall-e-3", "1792x1024", "hd")) == 120_000
    assert cost(usage.image_call("openai", "gpt-image-1", "1024x1024", "low")) == 11_000
    assert cost(usage.image_call("openai", "gpt-image-1", "1536x1024", "high")) == 250_000
    assert cost(usage.image_call("openai", "gpt-image-1", "1024x1536", "auto")) == 63_000  # as medium
    # tts-1: $15 per million characters -> 1,000 characters cost 1.5 cents.
    assert cost(usage.speech_call("openai", "tts-1", "a" * 1000, 60.0)) == 15_000
    assert cost(usage.speech_call("openai", "gpt-4o-mini-tts", "hi", 120.0)) == 30_000  # $0.015/min
    assert cost(usage.speech_call("zhipu", "glm-tts", "a" * 100, 3.0)) == 1_500
    assert cost(usage.image_call("zhipu", "glm-image", "1280x1280")) == 15_000
    assert cost(usage.reused("openai", "tts-1")) == 0
    assert cost(usage.image_call("openai", "my-local-model", "512x512")) == 0  # not priced: 0
    assert ("zhipu", "glm-image") in DEFAULT_PRICES and ("zhipu", "glm-tts") in DEFAULT_PRICES


def test_the_most_specific_image_price_wins_and_parts_add_up() -> None:
    price = ModelPrice(
        per_call=0.001,
        per_image=0.05,
        per_image_by={"hd/1024x1024": 0.2, "1024x1024": 0.1, "hd": 0.15},
        per_million_characters=10.0,
        per_minute_audio=0.6,
    )
    assert price.image_price("1024x1024", "hd") == 0.2
    assert price.image_price("1024x1024", "standard") == 0.1
    assert price.image_price("512x512", "hd") == 0.15
    assert price.image_price("512x512", "") == 0.05
    metered = Metered("openai", "m", calls=2, images=2, image_size="1024x1024", speech_characters=500_000)
    metered = metered + Metered("openai", "m", audio_seconds=30.0)
    # 2 calls, 2 images at 0.1, half a million characters at $10/M, half a minute at $0.6/min.
    assert PriceTable({("openai", "m"): price}).cost_micros(metered) == 2_000 + 200_000 + 5_000_000 + 300_000


def test_a_prices_file_replaces_the_entries_it_names() -> None:
    table = parse_prices(
        """
        [openai."dall-e-3"]
        per_image = 0.05
        per_image_by = { "hd/1024x1024" = 0.09 }

        [zhipu."*"]
        per_call = 0.002
        """
    )
    assert table.cost_micros(usage.image_call("openai", "dall-e-3", "1024x1024")) == 50_000
    assert table.cost_micros(usage.image_call("openai", "dall-e-3", "1024x1024", "hd")) == 90_000
    # The entry is replaced whole: its built-in sizes are gone with it.
    assert table.cost_micros(usage.image_call("openai", "dall-e-3", "1792x1024")) == 50_000
    assert table.cost_micros(usage.speech_call("openai", "tts-1", "a" * 1000, 1)) == 15_000  # untouched
    assert table.cost_micros(usage.image_call("zhipu", "glm-image", "1280x1280")) == 15_000  # listed
    assert table.cost_micros(usage.image_call("zhipu", "cogview-9", "1024x1024")) == 2_000  # "*"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[openai", "not valid TOML"),
        ('[acme."m"]\nper_call = 1', "unknown provider 'acme'"),
        ("openai = 3", "openai must be a table of models"),
        ('[openai."dall-e-3"]\nper_image = -1', 'openai."dall-e-3".per_image must be a number >= 0'),
        ('[openai."dall-e-3"]\nper_image = "4 cents"', 'openai."dall-e-3".per_image must be a number'),
        ('[openai."tts-1"]\nper_character = 1', "openai.\"tts-1\" has unknown keys ['per_character']"),
        ('[openai."x"]\nper_image_by = 3', 'openai."x".per_image_by must be a table'),
        ('[openai."x"]\nper_image_by = { hd = true }', 'openai."x".per_image_by.hd must be a number'),
        ("[openai]\nx = 1", 'openai."x" must be a table of prices'),
    ],
)
def test_a_bad_prices_file_is_refused_naming_the_setting_and_the_entry(text: str, named: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_prices(text)
    assert str(err.value).startswith("CHARAI_PRICES_FILE: ")
    assert named in str(err.value)


# -- periods and budgets -----------------------------------------------------------------------
def test_day_and_month_periods_are_utc_calendar_periods() -> None:
    last_moment = us(2024, 12, 31, 23, 59, 59) + 999_999
    assert usage.period_window("day", last_moment) == (us(2024, 12, 31), us(2025, 1, 1))
    assert usage.period_window("month", last_moment) == (us(2024, 12, 1), us(2025, 1, 1))
    assert usage.period_window("day", us(2025, 1, 1)) == (us(2025, 1, 1), us(2025, 1, 2))
    assert usage.period_window("month", us(2024, 2, 29, 12)) == (us(2024, 2, 1), us(2024, 3, 1))
    assert usage.period_window("month", us(2025, 11, 30)) == (us(2025, 11, 1), us(2025, 12, 1))
    assert usage.day_of(last_moment) == "2024-12-31"
    assert usage.day_of(last_moment + 1) == "2025-01-01"
    with pytest.raises(ValueError):
        usage.period_window("week", last_moment)


def test_a_budget_is_reached_when_spend_meets_the_limit() -> None:
    budgets = (Budget("day", 5.0, "usd"), Budget("month", 100, "images"))
    now = us(2025, 3, 31, 22)
    under = {"day": Totals(cost_micros=4_999_999), "month": Totals(images=99)}
    assert usage.first_reached("acme", budgets, under, now) is None
    at_limit = {"day": Totals(cost_micros=5_020_000), "month": Totals(images=99)}
    reached = usage.first_reached("acme", budgets, at_limit, now)
    assert reached is not None
    assert reached.description == "day/usd budget 5.00 reached (5.02 spent)"
    assert reached.period_end_us == us(2025, 4, 1)
    assert reached.retry_after(now) == 2 * 3600
    images = usage.first_reached("acme", budgets, {"month": Totals(images=100)}, now)
    assert images is not None and images.description == "month/images budget 100 reached (100 spent)"
    assert images.period_end_us == us(2025, 4, 1)
    # A limit of 0 refuses every create; no usage yet counts as nothing spent.
    stopped = usage.first_reached("acme", (Budget("day", 0, "audio_seconds"),), {}, now)
    assert stopped is not None and stopped.description == "day/audio_seconds budget 0.0 reached (0.0 spent)"
    assert Totals(audio_us=2_500_000, speech_characters=7).amount("audio_seconds") == 2.5
    assert Totals(speech_characters=7).amount("speech_characters") == 7


def test_the_spend_that_counts_starts_afresh_at_the_period_boundary() -> None:
    """What a store sums for a budget is the window of the current period: the same usage
    record counts before midnight and not after it (the day), yet still within the month."""
    spent_at = us(2025, 1, 31, 23, 59, 59)
    before, after = us(2025, 1, 31, 23, 59, 59) + 500_000, us(2025, 2, 1)
    day_before, day_after = usage.period_window("day", before), usage.period_window("day", after)
    assert day_before[0] <= spent_at < day_before[1]
    assert not day_after[0] <= spent_at < day_after[1]
    month_after = usage.period_window("month", after)
    assert not month_after[0] <= spent_at < month_after[1]  # February: January's spend is gone
    assert usage.period_window("month", us(2025, 1, 1))[0] <= spent_at


def test_day_ranges_default_to_this_month_and_name_the_bad_field() -> None:
    now = us(2025, 3, 17, 8)
    assert usage.day_range("", "", now) == ("2025-03-01", "2025-03-17")
    assert usage.day_range("2025-02-27", "2025-03-02", now) == ("2025-02-27", "2025-03-02")
    assert usage.day_window("2025-02-27", "2025-03-02") == (us(2025, 2, 27), us(2025, 3, 3))
    for start, end, field in [
        ("2025-3-1", "", "start_day"),
        ("", "yesterday", "end_day"),
        ("2025-03-10", "2025-03-09", "end_day"),
        ("2024-01-01", "2025-03-01", "end_day"),
    ]:
        with pytest.raises(usage.DayRangeError) as err:
            usage.day_range(start, end, now)
        assert err.value.field == field


def test_amounts_are_written_with_cents_and_the_micro_dollars_below_them() -> None:
    assert [usage.format_amount("usd", v) for v in (5, 5.02, 0.005, 0.000075, 0, 12.5)] == [
        "5.00",
        "5.02",
        "0.005",
        "0.000075",
        "0.00",
        "12.50",
    ]
    assert usage.format_amount("images", 3.0) == "3" and usage.format_amount("audio_seconds", 2.25) == "2.2"
