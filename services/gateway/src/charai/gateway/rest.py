"""The seed's REST routes (``characterTasksApi``) on the gateway's HTTP port, as JSON over gRPC.

Why through the loopback gRPC channel: a REST call is a TaskService call made on the client's
behalf (its ``Authorization`` header forwarded), so auth, validation, tenancy and logging are the
gRPC port's own. This module only translates: the seed's JSON in, the seed's JSON out, gRPC
status codes as HTTP statuses, the WatchTask stream as Server-Sent Events.

Routes: ``POST /api/tasks``, ``GET /api/tasks/{id}``, ``GET /api/tasks?metadata.characterId=…``,
``POST /api/tasks/{id}/cancel``, ``GET /api/tasks/{id}/events`` (SSE, resumable with
``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import hdrs, web
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.protobuf import json_format, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

#: A unary call's deadline (the gateway itself gives task_store at most 30 s).
CALL_TIMEOUT = 30.0
#: Largest JSON body (the HTTP app's ``client_max_size``).
MAX_BODY_BYTES = 1024 * 1024
#: How long a browser's EventSource waits before it reconnects with ``Last-Event-ID``.
SSE_RETRY_MS = 1000

TYPES = {
    "image_generation": task_pb2.TASK_TYPE_IMAGE_GENERATION,
    "tts_generation": task_pb2.TASK_TYPE_TTS_GENERATION,
}
PRIORITIES = {
    "low": task_pb2.PRIORITY_LOW,
    "normal": task_pb2.PRIORITY_NORMAL,
    "high": task_pb2.PRIORITY_HIGH,
}
STATUSES = {
    "queued": task_pb2.TASK_STATUS_QUEUED,
    "running": task_pb2.TASK_STATUS_RUNNING,
    "completed": task_pb2.TASK_STATUS_COMPLETED,
    "failed": task_pb2.TASK_STATUS_FAILED,
    "cancelled": task_pb2.TASK_STATUS_CANCELLED,
}
_TYPE_NAMES = {v: k for k, v in TYPES.items()}
_PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
_STATUS_NAMES = {v: k for k, v in STATUSES.items()}
_TERMINAL_EVENT_NAMES = {
    task_pb2.TASK_EVENT_TYPE_COMPLETED: "task:completed",
    task_pb2.TASK_EVENT_TYPE_FAILED: "task:failed",
    task_pb2.TASK_EVENT_TYPE_CANCELLED: "task:cancelled",
}
_TERMINAL_STATUS_NAMES = {
    task_pb2.TASK_STATUS_COMPLETED: "task:completed",
    task_pb2.TASK_STATUS_FAILED: "task:failed",
    task_pb2.TASK_STATUS_CANCELLED: "task:cancelled",
}
#: google.rpc's HTTP mapping of each gRPC code (``google/rpc/code.proto``).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

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
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+\-]+\+)?json$")
_SNAKE = re.compile(r"_([a-z0-9])")


class RestError(Exception):
    """An error answered as ``{"error": {code, message, fieldViolations}}``."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: list[tuple[str, str]] | None = None,
        *,
        http_status: int | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []
        self.http_status = http_status or HTTP_STATUS.get(code, 500)
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def invalid(cls, violations: list[tuple[str, str]]) -> RestError:
        summary = "; ".join(f"{f}: {d}" if f else d for f, d in violations)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", violations)

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> RestError:
        """The client's view of a failed call: code, message, bad fields (named as in the JSON)."""
        violations: list[tuple[str, str]] = []
        reason = ""
        retry_after: float | None = None
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += [(json_field(v.field), v.description) for v in bad.field_violations]
                elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        message = exc.details() or exc.code().name.lower()
        if violations:
            message = "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations)
        return cls(exc.code(), message, violations, reason=reason, retry_after=retry_after)

    def response(self) -> web.Response:
        error: dict[str, Any] = {
            "code": self.code.name,
            "message": self.message,
            "fieldViolations": [{"field": f, "description": d} for f, d in self.violations],
        }
        if self.reason:
            error["reason"] = self.reason
        headers = {}
        if self.code == grpc.StatusCode.UNAUTHENTICATED:
            headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
        elif self.code == grpc.StatusCode.UNAVAILABLE:
            headers[hdrs.RETRY_AFTER] = "1"
        elif self.retry_after is not None:  # a rate limit says when to come back
            headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(self.retry_after)))
        return web.json_response({"error": error}, status=self.http_status, headers=headers)


def json_field(path: str) -> str:
    """A violation's proto field path in the seed's JSON terms: ``image.character_id`` →
    ``payload.characterId``, ``request_id`` → ``requestId``; metadata keys stay as they are."""
    head, bracket, tail = path.partition("[")
    parts = []
    for i, name in enumerate(head.split(".")):
        if i == 0 and name in {"image", "tts"}:
            parts.append("payload")
        elif name == "after_sequence":
            parts.append("after")
        else:
            parts.append(_SNAKE.sub(lambda m: m.group(1).upper(), name))
    return ".".join(parts) + bracket + tail


# -- JSON in ----------------------------------------------------------------------------------


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
    elif task_type not in TYPES:
        bad.append(("type", "must be image_generation or tts_generation"))
    else:
        request.type = TYPES[task_type]
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
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            bad.append(("metadata", "must be an object of strings"))
        else:
            for key, value in metadata.items():
                if not isinstance(value, str):
                    bad.append((f"metadata.{key}", "must be a string"))
                else:
                    request.metadata[key] = value
    request_id = body.get("requestId")
    if request_id is not None and not isinstance(request_id, str):
        bad.append(("requestId", "must be a string"))
    elif request_id and idempotency_key and request_id != idempotency_key:
        bad.append(("requestId", "differs from the Idempotency-Key header"))
    else:
        request.request_id = request_id or idempotency_key or ""
    if bad:
        raise RestError.invalid(bad)
    return request


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
            if value not in TYPES:
                bad.append((key, "must be image_generation or tts_generation"))
            else:
                request.type = TYPES[value]
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


# -- JSON out ---------------------------------------------------------------------------------


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
        "code": task_pb2.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_"),
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
        "error": error_json(task),
        "attempt": task.attempt,
        "maxAttempts": task.max_attempts,
        "createdAt": _time(task.create_time),
        "startedAt": _time(task.start_time),
        "completedAt": _time(task.end_time),
        "updatedAt": _time(task.update_time),
        "nextAttemptAt": _time(task.next_attempt_time),
        "queuePosition": task.queue_position,
        "requestId": task.request_id or None,
    }


def event_name(event: task_pb2.TaskEvent) -> str:
    """The seed's WebSocket event name of a TaskEvent."""
    if event.type in _TERMINAL_EVENT_NAMES:
        return _TERMINAL_EVENT_NAMES[event.type]
    if event.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT and event.task.status in _TERMINAL_STATUS_NAMES:
        return _TERMINAL_STATUS_NAMES[event.task.status]
    return "task:progress"


def event_json(event: task_pb2.TaskEvent) -> dict[str, Any]:
    """The seed's event data ``{taskId, progress, status, stage, metadata, result?, error?}``, plus
    the sequence, charai's event type and the whole task (what ``subscribeToTask`` callbacks get)."""
    task = task_json(event.task)
    data: dict[str, Any] = {
        "taskId": task["id"],
        "progress": task["progress"],
        "status": task["status"],
        "stage": task["stage"],
        "metadata": task["metadata"],
    }
    if task["result"] is not None:
        data["result"] = task["result"]
    if task["error"] is not None:
        data["error"] = task["error"]
    data["sequence"] = event.sequence
    data["eventType"] = task_pb2.TaskEventType.Name(event.type).removeprefix("TASK_EVENT_TYPE_").lower()
    data["task"] = task
    return data


def sse_block(event: task_pb2.TaskEvent) -> bytes:
    """One Server-Sent Event; heartbeats are comments (they keep proxies and the socket awake
    without waking the page)."""
    if event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
        return b": heartbeat\n\n"
    lines = []
    if event.sequence > 0:
        lines.append(f"id: {event.sequence}")
    lines.append(f"event: {event_name(event)}")
    lines.append("data: " + json.dumps(event_json(event), ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


# -- routes -----------------------------------------------------------------------------------


def _call_metadata(request: web.Request) -> list[tuple[str, str]]:
    metadata = []
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    if authorization is not None and all(0x20 <= ord(c) <= 0x7E for c in authorization):
        metadata.append(("authorization", authorization))
    if request.remote:
        metadata.append(("x-forwarded-for", request.remote))
    return metadata


class RestApi:
    """The REST routes, calling TaskService over ``channel`` (loopback to this gateway's gRPC
    port; owned by the caller)."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float = CALL_TIMEOUT) -> None:
        self._stub: TaskServiceAsyncStub = task_service_pb2_grpc.TaskServiceStub(channel)  # type: ignore[assignment]
        self._timeout = call_timeout

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/tasks", self.create),
            web.get("/api/tasks", self.list_tasks),
            web.get("/api/tasks/{id}", self.get),
            web.post("/api/tasks/{id}/cancel", self.cancel),
            web.get("/api/tasks/{id}/events", self.events),
        ]

    async def create(self, request: web.Request) -> web.Response:
        try:
            mime = request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
            if not _JSON_TYPE.match(mime):
                raise RestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "send the task as JSON (Content-Type: application/json)",
                    http_status=415,
                )
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the body is larger than {MAX_BODY_BYTES} bytes",
                    http_status=413,
                ) from None
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RestError.invalid([("", f"the body is not valid JSON ({exc})")]) from None
            create = create_request(body, request.headers.get("Idempotency-Key"))
            response = await self._unary(self._stub.CreateTask, create, request)
        except RestError as exc:
            return exc.response()
        task = response.task
        return web.json_response(
            task_json(task), status=201, headers={hdrs.LOCATION: f"/api/tasks/{task.id}"}
        )

    async def get(self, request: web.Request) -> web.Response:
        try:
            response = await self._unary(
                self._stub.GetTask, task_service_pb2.GetTaskRequest(id=request.match_info["id"]), request
            )
        except RestError as exc:
            return exc.response()
        return web.json_response(task_json(response.task))

    async def cancel(self, request: web.Request) -> web.Response:
        try:
            response = await self._unary(
                self._stub.CancelTask,
                task_service_pb2.CancelTaskRequest(id=request.match_info["id"]),
                request,
            )
        except RestError as exc:
            return exc.response()
        return web.json_response(task_json(response.task))

    async def list_tasks(self, request: web.Request) -> web.Response:
        """A JSON array (``getCharacterTasks`` expects ``Task[]``); the next page's token is in
        ``X-Next-Page-Token`` and a ``Link: <…>; rel="next"`` header."""
        try:
            query = list_request(request.query, list(request.query.items()))
            response = await self._unary(self._stub.ListTasks, query, request)
        except RestError as exc:
            return exc.response()
        headers = {}
        if response.next_page_token:
            headers["X-Next-Page-Token"] = response.next_page_token
            next_url = request.rel_url.update_query(pageToken=response.next_page_token)
            headers[hdrs.LINK] = f'<{next_url}>; rel="next"'
        return web.json_response([task_json(t) for t in response.tasks], headers=headers)

    async def _unary(self, method: Any, message: Any, request: web.Request) -> Any:
        try:
            return await method(message, metadata=_call_metadata(request), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise RestError.from_rpc(exc) from None

    async def events(self, request: web.Request) -> web.StreamResponse:
        """WatchTask as Server-Sent Events, ending after the terminal event.

        A reconnecting EventSource sends ``Last-Event-ID`` and gets exactly the later events; when
        there are none and the task has ended, 204 tells it to stop reconnecting.
        """
        raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        if not raw_after.strip().isdigit():
            field = "Last-Event-ID" if "Last-Event-ID" in request.headers else "after"
            return RestError.invalid([(field, "must be an event id (a whole number)")]).response()
        after = int(raw_after.strip())
        if after >= 2**63:
            return RestError.invalid([("after", "is too large")]).response()
        call = self._stub.WatchTask(
            task_service_pb2.WatchTaskRequest(id=request.match_info["id"], after_sequence=after),
            metadata=_call_metadata(request),
        )
        try:
            return await self._stream(request, call)
        except asyncio.CancelledError:
            # The page closed the stream: release the server-side watcher at once.
            call.cancel()
            raise

    async def _stream(self, request: web.Request, call: Any) -> web.StreamResponse:
        events = call.__aiter__()
        try:
            first = await anext(events)
        except StopAsyncIteration:
            return web.Response(status=204)
        except grpc.aio.AioRpcError as exc:
            return RestError.from_rpc(exc).response()
        response = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
                hdrs.CACHE_CONTROL: "no-cache, no-store",
                "X-Accel-Buffering": "no",
            },
        )
        try:
            await response.prepare(request)
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode() + sse_block(first.event))
            try:
                async for message in events:
                    await response.write(sse_block(message.event))
            except grpc.aio.AioRpcError as exc:
                error = RestError.from_rpc(exc)
                data = json.dumps({"error": {"code": error.code.name, "message": error.message}})
                await response.write(f"event: error\ndata: {data}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            call.cancel()
        return response
