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
    # Always said: whether the result came from an identical earlier request (no provider call).
    result["reused"] = bool(result.get("reused", False))
    return result


def payload_json(task: task_pb2.Task) -> dict[str, Any] | None:
    """The payload in lowerCamelCase, numbers as numbers (an image's int64 ``seed`` too)."""
    kind = task.WhichOneof("payload")
    if kind is None:
        return None
    payload = _message(getattr(task, kind))
    if "seed" in payload:
        payload["seed"] = int(payload["seed"])
    return payload


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


def usage_json(task: task_pb2.Task) -> dict[str, Any] | None:
    """What the task's provider calls used and cost (README, "Usage and budgets"), every figure
    present; None before anything was metered."""
    if not task.HasField("usage"):
        return None
    u = task.usage
    return {
        "provider": u.provider,
        "model": u.model,
        "calls": u.calls,
        "images": u.images,
        "imageSize": u.image_size,
        "imageQuality": u.image_quality,
        "speechCharacters": u.speech_characters,
        "audioSeconds": u.audio_seconds,
        "costUsd": u.cost_usd,
        "reused": u.reused,
    }


def task_json(task: task_pb2.Task) -> dict[str, Any]:
    """A task as the seed's frontend reads it: status strings, payload/result in lowerCamelCase."""
    return {
        "id": task.id,
        "type": _TYPE_NAMES.get(task.type),
        "priority": _PRIORITY_NAMES.get(task.priority, "normal"),
        "status": _STATUS_NAMES.get(task.status),
        "progress": task.progress,
        "stage": task.stage,
        "metadata": dict(task.metadata),
        "payload": payload_json(task),
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
        "usage": usage_json(task),
    }
