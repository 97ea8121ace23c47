"""The seed's JSON in: request bodies and query strings as TaskService requests.

Unknown or mistyped fields are a 400 naming them; the semantic checks are the gRPC port's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from charai.gateway.rest.errors import RestError
from charai.taskapi import PRIORITIES, STATUSES, TASK_TYPES
from charai.tasks.v1 import task_pb2, task_service_pb2

# The JSON each payload kind accepts: field → (proto field, JSON type).
_STR = "string"
_NUM = "number"
_OBJ = "object"
IMAGE_FIELDS = {
    "characterId": ("character_id", _STR),
    "characterName": ("character_name", _STR),
    "prompt": ("prompt", _STR),
    "resolution": ("resolution", _STR),
    "viewType": ("view_type", _STR),
    "costumeId": ("costume_id", _STR),
    "callback": ("callback", _OBJ),
}
TTS_FIELDS = {
    "characterId": ("character_id", _STR),
    "characterName": ("character_name", _STR),
    "text": ("text", _STR),
    "voiceStyle": ("voice_style", _STR),
    "speed": ("speed", _NUM),
    "volume": ("volume", _NUM),
    "responseFormat": ("response_format", _STR),
    "callback": ("callback", _OBJ),
}
CALLBACK_FIELDS = {
    "type": ("type", _STR),
    "characterId": ("character_id", _STR),
    "viewType": ("view_type", _STR),
    "costumeId": ("costume_id", _STR),
}
TOP_LEVEL_FIELDS = frozenset({"type", "priority", "payload", "metadata", "requestId"})
LIST_PARAMS = frozenset({"type", "status", "pageSize", "pageToken"})


def _put_fields(
    target: Any,
    data: Mapping[str, Any],
    fields: Mapping[str, tuple[str, str]],
    prefix: str,
    bad: list[tuple[str, str]],
) -> None:
    """Copies ``data`` into the proto message ``target``, naming each unknown or mistyped field."""
    for key, value in data.items():
        path = f"{prefix}.{key}"
        if key not in fields:
            bad.append((path, "unknown field"))
            continue
        if value is None:
            continue  # null: same as absent
        proto_name, kind = fields[key]
        if kind == _STR:
            if not isinstance(value, str):
                bad.append((path, "must be a string"))
            else:
                setattr(target, proto_name, value)
        elif kind == _NUM:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                bad.append((path, "must be a number"))
            else:
                setattr(target, proto_name, float(value))
        elif not isinstance(value, dict):
            bad.append((path, "must be an object"))
        else:
            _put_fields(getattr(target, proto_name), value, CALLBACK_FIELDS, path, bad)
            target.callback.SetInParent()


def create_request(body: Any, idempotency_key: str | None) -> task_service_pb2.CreateTaskRequest:
    """The seed's ``characterTasksApi`` body as a CreateTaskRequest; unknown or mistyped fields
    are a 400 naming them (the semantic checks are the gRPC port's)."""
    if not isinstance(body, dict):
        raise RestError.invalid([("", "the body must be a JSON object")])
    bad: list[tuple[str, str]] = [(key, "unknown field") for key in body if key not in TOP_LEVEL_FIELDS]
    request = task_service_pb2.CreateTaskRequest()
    task_type = body.get("type")
    if task_type is None:
        bad.append(("type", "is required: image_generation or tts_generation"))
    elif task_type not in TASK_TYPES:
        bad.append(("type", "must be image_generation or tts_generation"))
    else:
        request.type = TASK_TYPES[task_type]
    priority = body.get("priority")
    if priority is not None:
        if priority not in PRIORITIES:
            bad.append(("priority", "must be low, normal or high"))
        else:
            request.priority = PRIORITIES[priority]
    payload = body.get("payload")
    if payload is None:
        bad.append(("payload", "is required"))
    elif not isinstance(payload, dict):
        bad.append(("payload", "must be an object"))
    elif request.type == task_pb2.TASK_TYPE_IMAGE_GENERATION:
        _put_fields(request.image, payload, IMAGE_FIELDS, "payload", bad)
        request.image.SetInParent()
    elif request.type == task_pb2.TASK_TYPE_TTS_GENERATION:
        _put_fields(request.tts, payload, TTS_FIELDS, "payload", bad)
        request.tts.SetInParent()
    _put_metadata(request, body.get("metadata"), bad)
    _put_request_id(request, body.get("requestId"), idempotency_key, bad)
    if bad:
        raise RestError.invalid(bad)
    return request


def _put_metadata(
    request: task_service_pb2.CreateTaskRequest, metadata: Any, bad: list[tuple[str, str]]
) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        bad.append(("metadata", "must be an object of strings"))
        return
    for key, value in metadata.items():
        if not isinstance(value, str):
            bad.append((f"metadata.{key}", "must be a string"))
        else:
            request.metadata[key] = value


def _put_request_id(
    request: task_service_pb2.CreateTaskRequest,
    request_id: Any,
    idempotency_key: str | None,
    bad: list[tuple[str, str]],
) -> None:
    """``requestId`` or the ``Idempotency-Key`` header (both: they must agree)."""
    if request_id is not None and not isinstance(request_id, str):
        bad.append(("requestId", "must be a string"))
    elif request_id and idempotency_key and request_id != idempotency_key:
        bad.append(("requestId", "differs from the Idempotency-Key header"))
    else:
        request.request_id = request_id or idempotency_key or ""


def list_request(query: Mapping[str, str], items: list[tuple[str, str]]) -> task_service_pb2.ListTasksRequest:
    """``?metadata.characterId=…&metadata.category=…&type=&status=&pageSize=&pageToken=``."""
    request = task_service_pb2.ListTasksRequest()
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in items:
        if key in seen:
            bad.append((key, "given more than once"))
            continue
        seen.add(key)
        if key.startswith("metadata."):
            request.metadata[key[len("metadata.") :]] = value
        elif key == "type":
            if value not in TASK_TYPES:
                bad.append((key, "must be image_generation or tts_generation"))
            else:
                request.type = TASK_TYPES[value]
        elif key == "status":
            if value not in STATUSES:
                bad.append((key, f"must be one of {', '.join(STATUSES)}"))
            else:
                request.status = STATUSES[value]
        elif key == "pageSize":
            if not value.isdigit():
                bad.append((key, "must be a whole number"))
            else:
                request.page_size = min(int(value), 2**31 - 1)
        elif key == "pageToken":
            request.page_token = value
        elif key != "_":  # ``_`` is the usual cache-buster
            bad.append(
                (key, "unknown query parameter (use metadata.<key>, type, status, pageSize, pageToken)")
            )
    if bad:
        raise RestError.invalid(bad)
    return request
