"""Short names of the task enums, and the tables that parse them back.

A label is the enum value's name without its prefix, in lower case: ``TASK_STATUS_QUEUED`` →
``queued``, ``TASK_TYPE_IMAGE_GENERATION`` → ``image_generation``. They are what the REST routes'
JSON, the metrics' label values and the CLI's options speak. Error codes are shown in upper case
(``PROVIDER_AUTH``, the REST ``error.code`` and what the CLI prints) by :func:`error_code_name`.
A number this build does not know (a newer server's) is labelled with its digits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from charai.tasks.v1 import task_pb2


def _labels(enum: Any, prefix: str) -> dict[Any, str]:
    """``{value: label}`` of every value of a generated enum (``UNSPECIFIED`` included)."""
    return {number: name.removeprefix(prefix).lower() for name, number in enum.items()}


_TYPE = _labels(task_pb2.TaskType, "TASK_TYPE_")
_PRIORITY = _labels(task_pb2.Priority, "PRIORITY_")
_STATUS = _labels(task_pb2.TaskStatus, "TASK_STATUS_")
_EVENT_TYPE = _labels(task_pb2.TaskEventType, "TASK_EVENT_TYPE_")
_ERROR_CODE = _labels(task_pb2.ErrorCode, "ERROR_CODE_")


def _parse_table(labels: Mapping[Any, str]) -> dict[str, Any]:
    """``{label: value}`` of every value but ``UNSPECIFIED``, in the enum's order."""
    return {label: value for value, label in labels.items() if value}


#: ``image_generation`` / ``tts_generation`` → the TaskType (REST ``type``, ``?type=``).
TASK_TYPES: Mapping[str, task_pb2.TaskType.ValueType] = _parse_table(_TYPE)
#: ``low`` / ``normal`` / ``high`` → the Priority.
PRIORITIES: Mapping[str, task_pb2.Priority.ValueType] = _parse_table(_PRIORITY)
#: ``queued`` / ``running`` / ``completed`` / ``failed`` / ``cancelled`` → the TaskStatus.
STATUSES: Mapping[str, task_pb2.TaskStatus.ValueType] = _parse_table(_STATUS)


def type_label(value: int) -> str:
    """``TASK_TYPE_IMAGE_GENERATION`` → ``image_generation``."""
    return _TYPE.get(value) or str(value)


def priority_label(value: int) -> str:
    """``PRIORITY_HIGH`` → ``high``."""
    return _PRIORITY.get(value) or str(value)


def status_label(value: int) -> str:
    """``TASK_STATUS_RUNNING`` → ``running``."""
    return _STATUS.get(value) or str(value)


def event_type_label(value: int) -> str:
    """``TASK_EVENT_TYPE_RETRY_SCHEDULED`` → ``retry_scheduled``."""
    return _EVENT_TYPE.get(value) or str(value)


def error_code_label(value: int) -> str:
    """``ERROR_CODE_RATE_LIMITED`` → ``rate_limited`` (a metric label value)."""
    return _ERROR_CODE.get(value) or str(value)


def error_code_name(value: int) -> str:
    """``ERROR_CODE_RATE_LIMITED`` → ``RATE_LIMITED``: how a task's error code is shown."""
    return error_code_label(value).upper()
