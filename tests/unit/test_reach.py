"""What an access token reaches (``charai.core.domain.reach``): pure, the one rule the gateway
and task_store share."""

from __future__ import annotations

from charai.core.domain import reach

PAIRS = (("characterId", "char_001"), ("category", "design"))


def test_a_task_is_reached_by_every_pair_of_the_scope_or_by_its_id() -> None:
    assert reach.matches(PAIRS, {"characterId": "char_001", "category": "design", "viewType": "front"})
    assert not reach.matches(PAIRS, {"characterId": "char_001"})  # one pair is not all of them
    assert not reach.matches(PAIRS, {"characterId": "char_002", "category": "design"})
    assert not reach.matches((), {"characterId": "char_001"})  # an empty scope reaches nothing
    assert reach.reaches({"task_1"}, (), "task_1", {})
    assert reach.reaches(frozenset(), PAIRS, "task_2", {"characterId": "char_001", "category": "design"})
    assert not reach.reaches({"task_1"}, PAIRS, "task_2", {"characterId": "char_001"})
    assert reach.matches({"characterId": "char_001"}.items(), {"characterId": "char_001"})  # a map's items
