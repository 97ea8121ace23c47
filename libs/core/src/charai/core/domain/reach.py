"""What an access token reaches: the tasks it names, and the tasks whose metadata holds each of
its metadata pairs. One rule for the gateway (every call a token makes) and task_store (a
token's create answering an earlier task of its ``request_id``). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


def matches(pairs: Iterable[tuple[str, str]], metadata: Mapping[str, str]) -> bool:
    """Whether a task with ``metadata`` lies inside the metadata scope ``pairs`` (an empty scope
    reaches nothing by metadata)."""
    found = False
    for key, value in pairs:
        if metadata.get(key) != value:
            return False
        found = True
    return found


def reaches(
    task_ids: Collection[str], pairs: Iterable[tuple[str, str]], task_id: str, metadata: Mapping[str, str]
) -> bool:
    """Whether a token naming ``task_ids`` with the metadata scope ``pairs`` reaches a task."""
    return task_id in task_ids or matches(pairs, metadata)
