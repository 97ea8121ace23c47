"""Which task statuses and events are final.

The pure domain core has its own ``charai.core.domain.states.TERMINAL`` (no protobuf there);
these are the same facts in the wire enums, for code that holds messages.
"""

from __future__ import annotations

from charai.tasks.v1 import task_pb2

#: A task in one of these statuses never changes again.
TERMINAL_STATUSES: frozenset[task_pb2.TaskStatus.ValueType] = frozenset(
    {task_pb2.TASK_STATUS_COMPLETED, task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_CANCELLED}
)
#: The event that moves a task into a terminal status: each task's log ends with exactly one.
TERMINAL_EVENTS: frozenset[task_pb2.TaskEventType.ValueType] = frozenset(
    {task_pb2.TASK_EVENT_TYPE_COMPLETED, task_pb2.TASK_EVENT_TYPE_FAILED, task_pb2.TASK_EVENT_TYPE_CANCELLED}
)


def is_final(event: task_pb2.TaskEvent) -> bool:
    """Whether nothing follows ``event`` on a WatchTask stream: a terminal event, or the snapshot
    of a task that had already ended when the watch began."""
    return event.type in TERMINAL_EVENTS or (
        event.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT and event.task.status in TERMINAL_STATUSES
    )
