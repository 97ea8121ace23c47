"""Per-tenant policy: each tenant's fair-share weight and its budgets, read from the tenants
file (``CHARAI_TENANTS_FILE``, TOML). Pure: parsing a text gives a :class:`Tenants`; nothing
here does I/O but :func:`load_tenants`.

The file::

    [defaults]                 # every tenant not listed below (optional)
    weight = 1

    [tenants.acme]
    weight = 3                 # 3 turns of a provider's capacity for every 1 of a weight-1 tenant
    budgets = [
      { period = "day", limit = 500, unit = "images" },
      { period = "month", limit = 200.0, unit = "usd" },
    ]

A bad file stops start-up with a message naming the setting and the entry, never a crash.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SETTING = "CHARAI_TENANTS_FILE"

PERIODS = ("day", "month")
#: What a budget may count: money from the price table, or a metered unit itself.
UNITS = ("usd", "images", "speech_characters", "audio_seconds")
MAX_WEIGHT = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` of ``unit`` per calendar ``period`` (UTC)."""

    period: str
    limit: float
    unit: str

    @property
    def name(self) -> str:
        """How errors name it, e.g. ``acme/day/usd``'s ``day/usd``."""
        return f"{self.period}/{self.unit}"


@dataclasses.dataclass(frozen=True, slots=True)
class TenantPolicy:
    weight: int = 1
    budgets: tuple[Budget, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Tenants:
    default: TenantPolicy = TenantPolicy()
    by_tenant: Mapping[str, TenantPolicy] = dataclasses.field(default_factory=dict)

    def policy(self, tenant: str) -> TenantPolicy:
        return self.by_tenant.get(tenant, self.default)

    def weight(self, tenant: str) -> int:
        return self.policy(tenant).weight


def _policy(where: str, entry: Any, base: TenantPolicy) -> TenantPolicy:
    if not isinstance(entry, dict):
        raise ValueError(f"{SETTING}: {where} must be a table")
    unknown = set(entry) - {"weight", "budgets"}
    if unknown:
        raise ValueError(f"{SETTING}: {where} has unknown keys {sorted(unknown)} (weight, budgets)")
    weight = entry.get("weight", base.weight)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"{SETTING}: {where}.weight must be a whole number from 1 to {MAX_WEIGHT}")
    raw = entry.get("budgets")
    if raw is None:
        return TenantPolicy(weight, base.budgets)
    if not isinstance(raw, list):
        raise ValueError(f"{SETTING}: {where}.budgets must be a list of tables")
    budgets: list[Budget] = []
    for i, item in enumerate(raw):
        at = f"{where}.budgets[{i}]"
        if not isinstance(item, dict) or set(item) != {"period", "limit", "unit"}:
            raise ValueError(f"{SETTING}: {at} must be {{ period = ..., limit = ..., unit = ... }}")
        if item["period"] not in PERIODS:
            raise ValueError(f"{SETTING}: {at}.period must be one of {', '.join(PERIODS)}")
        if item["unit"] not in UNITS:
            raise ValueError(f"{SETTING}: {at}.unit must be one of {', '.join(UNITS)}")
        limit = item["limit"]
        if not isinstance(limit, int | float) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"{SETTING}: {at}.limit must be a number >= 0")
        budget = Budget(item["period"], float(limit), item["unit"])
        if any(b.name == budget.name for b in budgets):
            raise ValueError(f"{SETTING}: {at} repeats the budget {budget.name}")
        budgets.append(budget)
    return TenantPolicy(weight, tuple(budgets))


def parse_tenants(text: str) -> Tenants:
    """The policy a tenants file gives; raises ValueError naming the setting and the entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{SETTING}: not valid TOML ({exc})") from None
    unknown = set(doc) - {"defaults", "tenants"}
    if unknown:
        raise ValueError(f"{SETTING}: unknown sections {sorted(unknown)} (defaults, tenants)")
    default = _policy("defaults", doc.get("defaults", {}), TenantPolicy())
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ValueError(f"{SETTING}: tenants must be a table of tenants")
    return Tenants(default, {name: _policy(f"tenants.{name}", e, default) for name, e in tenants.items()})


def load_tenants(path: Path | None) -> Tenants:
    """The tenants file's policy; every tenant weight 1 and no budget when ``path`` is None."""
    if path is None:
        return Tenants()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{SETTING}: cannot read {path} ({exc.strerror})") from None
    return parse_tenants(text)
