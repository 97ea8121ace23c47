"""The price table: what a metered call costs, per provider and model, in US dollars.

Built-in defaults (:data:`DEFAULT_PRICES`) are examples taken from public price lists where we
know them; the Zhipu entries are placeholders (Zhipu bills in CNY and its image/speech prices
change): set real ones in the prices file (``CHARAI_PRICES_FILE``, TOML). Each entry the file
names replaces the built-in one of that provider and model; the others stay. Pure: parsing a
text gives a :class:`PriceTable`; reading the file is the caller's.

The file::

    [openai."dall-e-3"]
    per_image = 0.04                             # any size or quality not listed below
    per_image_by = { "hd/1024x1024" = 0.08, "1792x1024" = 0.08 }

    [openai."tts-1"]
    per_million_characters = 15.0

    [zhipu."glm-tts"]
    per_call = 0.001
    per_minute_audio = 0.006

An entry may combine ``per_call`` (each charged call), ``per_image`` / ``per_image_by`` (each
image; ``per_image_by`` keys are ``quality/size``, ``size`` or ``quality``, the most specific
that matches wins), ``per_million_characters`` (text spoken) and ``per_minute_audio`` (audio
produced). A model named ``"*"`` prices every model of that provider the table does not list.
A call of a provider and model with no price costs 0 (its units are still metered).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from typing import Any

from charai.core.domain.usage import MICROS_PER_USD, Metered

SETTING = "CHARAI_PRICES_FILE"
PROVIDERS = ("zhipu", "openai")
_NUMBERS = ("per_call", "per_image", "per_million_characters", "per_minute_audio")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPrice:
    """The prices of one provider's model (see the module for each field)."""

    per_call: float = 0.0
    per_image: float = 0.0
    per_image_by: Mapping[str, float] = dataclasses.field(default_factory=dict)
    per_million_characters: float = 0.0
    per_minute_audio: float = 0.0

    def image_price(self, size: str, quality: str) -> float:
        """One image of ``size`` and ``quality``: the most specific ``per_image_by`` entry."""
        for key in (f"{quality}/{size}", size, quality):
            if key in self.per_image_by:
                return self.per_image_by[key]
        return self.per_image

    def cost_usd(self, metered: Metered) -> float:
        if metered.reused:
            return 0.0
        return (
            metered.calls * self.per_call
            + metered.images * self.image_price(metered.image_size, metered.image_quality)
            + metered.speech_characters * self.per_million_characters / 1_000_000
            + metered.audio_seconds / 60 * self.per_minute_audio
        )


def _sizes(standard: tuple[float, float], hd: tuple[float, float]) -> dict[str, float]:
    """dall-e-3: square, then portrait and landscape, for each quality (square/tall standard
    also under the bare size: the model's default quality is standard)."""
    square, wide = standard
    return {
        "1024x1024": square,
        "1024x1792": wide,
        "1792x1024": wide,
        "standard/1024x1024": square,
        "standard/1024x1792": wide,
        "standard/1792x1024": wide,
        "hd/1024x1024": hd[0],
        "hd/1024x1792": hd[1],
        "hd/1792x1024": hd[1],
    }


def _gpt_image(
    low: tuple[float, float], medium: tuple[float, float], high: tuple[float, float]
) -> ModelPrice:
    """gpt-image-1 by quality and size (square, then 1024x1536 / 1536x1024); ``auto`` or no
    quality is priced as medium."""
    by: dict[str, float] = {}
    for quality, (square, wide) in (("low", low), ("medium", medium), ("high", high)):
        by |= {f"{quality}/1024x1024": square, f"{quality}/1024x1536": wide, f"{quality}/1536x1024": wide}
    by |= {"1024x1024": medium[0], "1024x1536": medium[1], "1536x1024": medium[1]}
    return ModelPrice(per_image=medium[0], per_image_by=by)


#: Examples from public price lists (OpenAI, USD); Zhipu's are placeholders (see the module).
DEFAULT_PRICES: Mapping[tuple[str, str], ModelPrice] = {
    ("openai", "dall-e-3"): ModelPrice(per_image=0.04, per_image_by=_sizes((0.04, 0.08), (0.08, 0.12))),
    ("openai", "dall-e-2"): ModelPrice(
        per_image=0.02, per_image_by={"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}
    ),
    ("openai", "gpt-image-1"): _gpt_image((0.011, 0.016), (0.042, 0.063), (0.167, 0.25)),
    ("openai", "tts-1"): ModelPrice(per_million_characters=15.0),
    ("openai", "tts-1-hd"): ModelPrice(per_million_characters=30.0),
    # Billed by audio tokens; OpenAI's own estimate is about $0.015 a minute of speech.
    ("openai", "gpt-4o-mini-tts"): ModelPrice(per_minute_audio=0.015),
    # Placeholders: about Zhipu's list prices in CNY converted to USD; set yours in the file.
    ("zhipu", "glm-image"): ModelPrice(per_image=0.015),
    ("zhipu", "cogview-4"): ModelPrice(per_image=0.0085),
    ("zhipu", "cogview-4-250304"): ModelPrice(per_image=0.0085),
    ("zhipu", "cogview-3-flash"): ModelPrice(),
    ("zhipu", "glm-tts"): ModelPrice(per_million_characters=15.0),
}


@dataclasses.dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by (provider, model); see the module for defaults and the wildcard."""

    entries: Mapping[tuple[str, str], ModelPrice] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_PRICES)
    )

    def of(self, provider: str, model: str) -> ModelPrice | None:
        return self.entries.get((provider, model)) or self.entries.get((provider, "*"))

    def cost_micros(self, metered: Metered) -> int:
        """What ``metered`` cost, in whole micro-dollars (0 when reused or not priced)."""
        price = self.of(metered.provider, metered.model)
        if price is None:
            return 0
        return round(price.cost_usd(metered) * MICROS_PER_USD)


def _number(where: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{SETTING}: {where} must be a number >= 0 (US dollars)")
    return float(value)


def _entry(where: str, raw: Any) -> ModelPrice:
    if not isinstance(raw, dict):
        raise ValueError(f"{SETTING}: {where} must be a table of prices")
    known = (*_NUMBERS, "per_image_by")
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{SETTING}: {where} has unknown keys {sorted(unknown)} ({', '.join(known)})")
    numbers = {name: _number(f"{where}.{name}", raw[name]) for name in _NUMBERS if name in raw}
    by = raw.get("per_image_by", {})
    if not isinstance(by, dict):
        raise ValueError(f"{SETTING}: {where}.per_image_by must be a table of size or quality = price")
    per_image_by = {str(key): _number(f"{where}.per_image_by.{key}", value) for key, value in by.items()}
    return ModelPrice(per_image_by=per_image_by, **numbers)


def parse_prices(text: str, defaults: Mapping[tuple[str, str], ModelPrice] = DEFAULT_PRICES) -> PriceTable:
    """The defaults with the file's entries over them; raises ValueError naming the setting and
    the entry (e.g. ``openai."dall-e-3".per_image``)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{SETTING}: not valid TOML ({exc})") from None
    entries = dict(defaults)
    for provider, models in doc.items():
        if provider not in PROVIDERS:
            raise ValueError(f"{SETTING}: unknown provider {provider!r} ({', '.join(PROVIDERS)})")
        if not isinstance(models, dict):
            raise ValueError(f"{SETTING}: {provider} must be a table of models")
        for model, raw in models.items():
            entries[(provider, model)] = _entry(f'{provider}."{model}"', raw)
    return PriceTable(entries)
