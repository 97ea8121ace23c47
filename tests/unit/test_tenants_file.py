"""The tenants file: weights and budgets, and a clear error naming the entry for a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest
from charai.core.tenants import Budget, TenantPolicy, load_tenants, parse_tenants

GOOD = """
[defaults]
weight = 2
budgets = [{ period = "month", limit = 50, unit = "usd" }]

[tenants.acme]
weight = 3
budgets = [
  { period = "day", limit = 500, unit = "images" },
  { period = "month", limit = 200.5, unit = "usd" },
]

[tenants.small]
budgets = []
"""


def test_weights_and_budgets_per_tenant_with_defaults() -> None:
    tenants = parse_tenants(GOOD)
    assert tenants.policy("acme") == TenantPolicy(
        3, (Budget("day", 500.0, "images"), Budget("month", 200.5, "usd"))
    )
    assert tenants.policy("other") == TenantPolicy(2, (Budget("month", 50.0, "usd"),))
    assert tenants.policy("small") == TenantPolicy(2, ())
    assert tenants.weight("acme") == 3


def test_no_file_means_weight_one_and_no_budget() -> None:
    assert load_tenants(None).policy("x") == TenantPolicy(1, ())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[tenants.a]\nweight = 0", "tenants.a.weight"),
        ("[tenants.a]\nweight = true", "tenants.a.weight"),
        ("[tenants.a]\nwieght = 2", "tenants.a has unknown keys"),
        (
            '[tenants.a]\nbudgets = [{ period = "week", limit = 1, unit = "usd" }]',
            "tenants.a.budgets[0].period",
        ),
        (
            '[tenants.a]\nbudgets = [{ period = "day", limit = -1, unit = "usd" }]',
            "tenants.a.budgets[0].limit",
        ),
        ('[tenants.a]\nbudgets = [{ period = "day", limit = 1, unit = "eur" }]', "tenants.a.budgets[0].unit"),
        ('[tenants.a]\nbudgets = [{ period = "day", limit = 1 }]', "tenants.a.budgets[0] must be"),
        (
            '[tenants.a]\nbudgets = [{ period = "day", limit = 1, unit = "usd" },'
            ' { period = "day", limit = 2, unit = "usd" }]',
            "repeats the budget day/usd",
        ),
        ("[tenant.a]", "unknown sections"),
        ("weight = ", "not valid TOML"),
    ],
)
def test_bad_entries_are_named(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="CHARAI_TENANTS_FILE") as info:
        parse_tenants(text)
    assert named in str(info.value)


def test_unreadable_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CHARAI_TENANTS_FILE: cannot read"):
        load_tenants(tmp_path / "missing.toml")
