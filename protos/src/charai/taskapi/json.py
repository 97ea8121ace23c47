"""Tasks as JSON: the shape the REST routes answer, SSE events carry and webhooks deliver
(status strings, payload and result in lowerCamelCase, ``error`` as the message string)."""

from __future__ import annotations

from typing import Any

from charai.taskapi.labels import PRIORITIES, STATUSES, TASK_TYPES, error_code_name
from charai.tasks.v1 import task_pb2
from google.protobuf import json_format, timestamp_pb2

_TYPE_NAMES = {v: k for k, v in TASK_TYPES.items()}
_PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
_STATUS_NAMES = {v: k for k, v in STATUSES.items()}


def _time(ts: timestamp_pb2.Timestamp) -> str | None:
    return ts.ToJsonString() if (ts.seconds or ts.nanos) else None


def _message(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def result_json(task: task_pb2.Task) -> dict[str, Any] | None:
    """The result in the seed's shape (plus charai's extra fields), numbers as numbers."""
    kind = task.WhichOneof("result")
    if kind is None:
        return None
    result = _message(getattr(task, kind))
    if "sizeBytes" in result:
        result["sizeBytes"] = int(result["sizeBytes"])
    if kind == "tts_result" and "durationSeconds" in result:
        result["duration"] = result["durationSeconds"]  # the seed's TTSGenerationResult.duration
    return result


def error_json(task: task_pb2.Task) -> dict[str, Any] | None:
    if not task.HasField("error"):
        return None
    error = task.error
    out: dict[str, Any] = {
        "code": error_code_name(error.code),
        "message": error.message,
        "retryable": error.retryable,
    }
    if error.provider_status:
        out["providerStatus"] = error.provider_status
    if error.provider_code:
        out["providerCode"] = error.provider_code
    return out


def task_json(task: task_pb2.Task) -> dict[str, Any]:
    """A task as the seed's frontend reads it: status strings, payload/result in lowerCamelCase."""
    kind = task.WhichOneof("payload")
    return {
        "id": task.id,
        "type": _TYPE_NAMES.get(task.type),
        "priority": _PRIORITY_NAMES.get(task.priority, "normal"),
        "status": _STATUS_NAMES.get(task.status),
        "progress": task.progress,
        "stage": task.stage,
        "metadata": dict(task.metadata),
        "payload": _message(getattr(task, kind)) if kind else None,
        "result": result_json(task),
        # The seed prints `${task.error}`: the message itself; the structure is errorDetail.
        "error": task.error.message if task.HasField("error") else None,
        "errorDetail": error_json(task),
        "attempt": task.attempt,
        "maxAttempts": task.max_attempts,
        "createdAt": _time(task.create_time),
        "startedAt": _time(task.start_time),
        "completedAt": _time(task.end_time),
        "updatedAt": _time(task.update_time),
        "nextAttemptAt": _time(task.next_attempt_time),
        "queuePosition": task.queue_position,
        "estimatedStartAt": _time(task.estimated_start_time),
        "estimatedEndAt": _time(task.estimated_end_time),
        "requestId": task.request_id or None,
        "webhook": {"url": task.webhook.url, "events": list(task.webhook.events)}
        if task.HasField("webhook")
        else None,
    }
