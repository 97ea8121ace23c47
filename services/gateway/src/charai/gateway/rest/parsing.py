"""The seed's JSON in: request bodies and query strings as TaskService requests.

Unknown or mistyped fields are a 400 naming them; the semantic checks are the gRPC port's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from charai.core.validation import whole_number
from charai.gateway.rest.errors import RestError
from charai.taskapi import PRIORITIES, STATUSES, TASK_TYPES
from charai.tasks.v1 import task_pb2, task_service_pb2

# The JSON each payload kind accepts: field → (proto field, JSON type).
_STR = "string"
_NUM = "number"
_OBJ = "object"
_BOOL = "boolean"
_INT = "integer"
IMAGE_FIELDS = {
    "characterId": ("character_id", _STR),
    "characterName": ("character_name", _STR),
    "prompt": ("prompt", _STR),
    "resolution": ("resolution", _STR),
    "viewType": ("view_type", _STR),
    "costumeId": ("costume_id", _STR),
    "callback": ("callback", _OBJ),
    "quality": ("quality", _STR),
    "outputFormat": ("output_format", _STR),
    "seed": ("seed", _INT),
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
    "reuse": ("reuse", _BOOL),
}
CALLBACK_FIELDS = {
    "type": ("type", _STR),
    "characterId": ("character_id", _STR),
    "viewType": ("view_type", _STR),
    "costumeId": ("costume_id", _STR),
}
TOP_LEVEL_FIELDS = frozenset({"type", "priority", "payload", "metadata", "requestId", "webhook"})
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
        elif kind == _BOOL:
            if not isinstance(value, bool):
                bad.append((path, "must be true or false"))
            else:
                setattr(target, proto_name, value)
        elif kind == _INT:
            # The range is the gRPC port's check; here only what fits the field (int64).
            if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
                bad.append((path, "must be a whole number"))
            else:
                setattr(target, proto_name, value)
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
    _put_webhook(request, body.get("webhook"), bad)
    if bad:
        raise RestError.invalid(bad)
    return request


def batch_create_request(body: Any) -> task_service_pb2.BatchCreateTasksRequest:
    """``{"requests": [<a POST /api/tasks body>, …]}``; every item's bad fields named
    ``requests[i].…`` (the semantic checks, all or none, are the gRPC port's)."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise RestError.invalid([("requests", 'the body must be {"requests": [task, …]}')])
    bad: list[tuple[str, str]] = [(key, "unknown field") for key in body if key != "requests"]
    batch = task_service_pb2.BatchCreateTasksRequest()
    for index, item in enumerate(body["requests"]):
        try:
            batch.requests.append(create_request(item, None))
        except RestError as exc:
            bad += [
                (f"requests[{index}].{field}" if field else f"requests[{index}]", d)
                for field, d in exc.violations
            ]
    if bad:
        raise RestError.invalid(bad)
    return batch


def _put_webhook(
    request: task_service_pb2.CreateTaskRequest, webhook: Any, bad: list[tuple[str, str]]
) -> None:
    """``webhook: {url, events?}`` (README, "Webhooks")."""
    if webhook is None:
        return
    if not isinstance(webhook, dict):
        bad.append(("webhook", "must be an object: {url, events}"))
        return
    bad.extend((f"webhook.{key}", "unknown field") for key in webhook if key not in ("url", "events"))
    url, events = webhook.get("url"), webhook.get("events", [])
    if not isinstance(url, str):
        bad.append(("webhook.url", "must be a string"))
    else:
        request.webhook.url = url
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        bad.append(("webhook.events", "must be a list of event names"))
    else:
        request.webhook.events.extend(events)


def _put_metadata(request: Any, metadata: Any, bad: list[tuple[str, str]]) -> None:
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


#: Tasks ``GET /api/tasks`` returns when the query names no ``pageSize`` (the seed's
#: ``getCharacterTasks`` reads one answer); more are paged with ``X-Next-Page-Token``.
LIST_CAP = 1000


def _filter_param(key: str, value: str, target: Any, bad: list[tuple[str, str]]) -> bool:
    """``metadata.<key>``, ``type`` and ``status`` into ``target`` (a list or watch request with
    ``metadata`` and ``type``; ``status`` only where it has one). False: not a filter key."""
    if key.startswith("metadata."):
        target.metadata[key[len("metadata.") :]] = value
    elif key == "type":
        if value not in TASK_TYPES:
            bad.append((key, "must be image_generation or tts_generation"))
        else:
            target.type = TASK_TYPES[value]
    elif key == "status":
        if value not in STATUSES:
            bad.append((key, f"must be one of {', '.join(STATUSES)}"))
        elif hasattr(target, "status"):
            target.status = STATUSES[value]
    else:
        return False
    return True


def _unique(items: list[tuple[str, str]], bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    kept = []
    for key, value in items:
        if key in seen:
            bad.append((key, "given more than once"))
        else:
            seen.add(key)
            kept.append((key, value))
    return kept


def list_request(query: Mapping[str, str], items: list[tuple[str, str]]) -> task_service_pb2.ListTasksRequest:
    """``?metadata.characterId=…&metadata.category=…&type=&status=&pageSize=&pageToken=``;
    ``pageSize`` up to :data:`LIST_CAP` (0 or absent: :data:`LIST_CAP`)."""
    request = task_service_pb2.ListTasksRequest()
    bad: list[tuple[str, str]] = []
    for key, value in _unique(items, bad):
        if _filter_param(key, value, request, bad):
            continue
        if key == "pageSize":
            if not whole_number(value) or int(value) > LIST_CAP:
                bad.append((key, f"must be a whole number from 0 to {LIST_CAP}"))
            else:
                request.page_size = int(value)
        elif key == "pageToken":
            request.page_token = value
        elif key != "_":  # ``_`` is the usual cache-buster
            bad.append(
                (key, "unknown query parameter (use metadata.<key>, type, status, pageSize, pageToken)")
            )
    if bad:
        raise RestError.invalid(bad)
    return request


def watch_request(items: list[tuple[str, str]], after: int) -> tuple[task_service_pb2.WatchTasksRequest, int]:
    """``GET /api/tasks/events?metadata.<key>=…&type=&status=`` as a WatchTasksRequest resuming
    after ``after``, and the status to keep (0: any; WatchTasks itself has no status filter)."""
    request = task_service_pb2.WatchTasksRequest(after_sequence=after)
    status = task_service_pb2.ListTasksRequest()
    bad: list[tuple[str, str]] = []
    for key, value in _unique(items, bad):
        target = status if key == "status" else request
        if _filter_param(key, value, target, bad) or key in {"_", "after", "access_token"}:
            continue
        bad.append((key, "unknown query parameter (use metadata.<key>, type, status, after)"))
    if bad:
        raise RestError.invalid(bad)
    return request, int(status.status)


def access_token_request(body: Any) -> task_service_pb2.CreateAccessTokenRequest:
    """``POST /api/access-tokens``: ``{taskIds?, metadata?, allowCreate?, ttl?}``, ``ttl`` in
    seconds (a number) or as a proto3 JSON duration (``"900s"``)."""
    if not isinstance(body, dict):
        raise RestError.invalid([("", "the body must be a JSON object")])
    request = task_service_pb2.CreateAccessTokenRequest()
    bad: list[tuple[str, str]] = [
        (key, "unknown field") for key in body if key not in {"taskIds", "metadata", "allowCreate", "ttl"}
    ]
    ids = body.get("taskIds") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        bad.append(("taskIds", "must be an array of task ids"))
    else:
        request.task_ids.extend(ids)
    _put_metadata(request, body.get("metadata"), bad)
    allow = body.get("allowCreate", False)
    if not isinstance(allow, bool):
        bad.append(("allowCreate", "must be true or false"))
    request.allow_create = allow is True
    ttl = body.get("ttl")
    if isinstance(ttl, str) and ttl.endswith("s") and _is_number(ttl[:-1]):
        ttl = float(ttl[:-1])
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
            bad.append(("ttl", 'must be a number of seconds (or a duration such as "900s")'))
        else:
            # At most what a Duration holds (~10,000 years): beyond the gateway's maximum anyway.
            request.ttl.FromNanoseconds(int(min(ttl, 315_576_000_000) * 1e9))
    if bad:
        raise RestError.invalid(bad)
    return request


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
