"""The REST routes themselves: each a TaskService call over the loopback channel."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import hdrs, web
from charai.core.validation import MAX_PAGE_SIZE
from charai.gateway.rest.calls import call_metadata
from charai.gateway.rest.errors import RestError
from charai.gateway.rest.parsing import (
    LIST_CAP,
    access_token_request,
    batch_create_request,
    create_request,
    list_request,
)
from charai.gateway.rest.streams import EventStreams
from charai.gateway.rest.usage import usage_json, usage_request
from charai.gateway.rest.views import task_json
from charai.tasks.v1 import task_service_pb2, task_service_pb2_grpc

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

#: A unary call's deadline (the gateway itself gives task_store at most 30 s).
CALL_TIMEOUT = 30.0
#: Largest JSON body (the HTTP app's ``client_max_size``): a batch of 100 creates, each at its
#: largest, is 3.3 MiB of UTF-8 JSON, and 9.4 MiB with every non-ASCII character written as a
#: ``\u`` escape, six bytes per UTF-16 unit (as Python's ``json.dumps`` writes it, and this
#: gateway's own answers).
MAX_BODY_BYTES = 12 * 1024 * 1024
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+\-]+\+)?json$")
#: A ``\u`` escape of a UTF-16 surrogate: JSON may spell one alone, which no string field can hold.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any) -> str | None:
    """The JSON path (``payload.text``, ``requests[1].metadata.k``) of the first string or key
    holding a lone surrogate, or None. Without recursion: JSON may nest as deep as the parser
    allowed."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return _SURROGATE.sub("\ufffd", path) or "the body"
        elif isinstance(item, dict):
            for key, sub in reversed(item.items()):
                named = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return _SURROGATE.sub("\ufffd", named)  # the answer must be text itself
                stack.append((named, sub))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", sub) for i, sub in reversed(list(enumerate(item))))
    return None


async def _json_body(request: web.Request, what: str) -> Any:
    """The request's JSON body (415 when it is not JSON, 413 when too large, 400 when broken)."""
    mime = request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
    if not _JSON_TYPE.match(mime):
        raise RestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"send {what} as JSON (Content-Type: application/json)",
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
    except RecursionError:
        raise RestError.invalid([("", "the body nests arrays or objects too deeply")]) from None
    if _SURROGATE_ESCAPE.search(raw) and (where := lone_surrogate_at(body)) is not None:
        raise RestError.invalid([(where, "holds a lone UTF-16 surrogate (\\ud800-\\udfff): not text")])
    return body


class RestApi:
    """The REST routes, calling TaskService over ``channel`` (loopback to this gateway's gRPC
    port; owned by the caller)."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float = CALL_TIMEOUT) -> None:
        self._stub: TaskServiceAsyncStub = task_service_pb2_grpc.TaskServiceStub(channel)  # type: ignore[assignment]
        self._timeout = call_timeout

    def routes(self) -> list[web.RouteDef]:
        streams = EventStreams(self._stub)
        return [
            web.post("/api/tasks", self.create),
            web.post("/api/tasks:batchCreate", self.batch_create),
            web.get("/api/tasks", self.list_tasks),
            # Before /api/tasks/{id}, which would take "events" for an id.
            web.get("/api/tasks/events", streams.many),
            web.get("/api/tasks/{id}", self.get),
            web.delete("/api/tasks/{id}", self.delete),
            web.post("/api/tasks/{id}/cancel", self.cancel),
            web.get("/api/tasks/{id}/events", streams.one),
            web.post("/api/access-tokens", self.create_access_token),
            web.get("/api/usage", self.usage),
        ]

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request, "the task")
            create = create_request(body, request.headers.get("Idempotency-Key"))
            response = await self._unary(self._stub.CreateTask, create, request)
        except RestError as exc:
            return exc.response()
        task = response.task
        return web.json_response(
            task_json(task), status=201, headers={hdrs.LOCATION: f"/api/tasks/{task.id}"}
        )

    async def batch_create(self, request: web.Request) -> web.Response:
        """AIP-233 over REST: ``{"requests": [...]}`` → ``{"tasks": [...]}`` in the same order."""
        try:
            body = await _json_body(request, "the batch")
            response = await self._unary(self._stub.BatchCreateTasks, batch_create_request(body), request)
        except RestError as exc:
            return exc.response()
        return web.json_response({"tasks": [task_json(task) for task in response.tasks]})

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

    async def delete(self, request: web.Request) -> web.Response:
        try:
            await self._unary(
                self._stub.DeleteTask,
                task_service_pb2.DeleteTaskRequest(id=request.match_info["id"]),
                request,
            )
        except RestError as exc:
            return exc.response()
        return web.Response(status=204)

    async def create_access_token(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request, "the token request")
            message = access_token_request(body)
            response = await self._unary(self._stub.CreateAccessToken, message, request)
        except RestError as exc:
            return exc.response()
        return web.json_response(
            {"token": response.token, "expireTime": response.expire_time.ToJsonString()},
            status=201,
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    async def usage(self, request: web.Request) -> web.Response:
        """GetUsage: metered usage by tenant, provider, model and day, and the tenant's budgets."""
        try:
            message = usage_request(list(request.query.items()))
            response = await self._unary(self._stub.GetUsage, message, request)
        except RestError as exc:
            return exc.response()
        return web.json_response(usage_json(response))

    async def list_tasks(self, request: web.Request) -> web.Response:
        """A JSON array (``getCharacterTasks`` expects ``Task[]``) of up to ``pageSize`` tasks,
        :data:`LIST_CAP` when not given, read from TaskService a page of at most 500 at a time;
        the next page's token is in ``X-Next-Page-Token`` and a ``Link: <…>; rel="next"`` header."""
        try:
            query = list_request(request.query, list(request.query.items()))
            tasks, token = await self._list(query, request)
        except RestError as exc:
            return exc.response()
        headers = {}
        if token:
            headers["X-Next-Page-Token"] = token
            next_url = request.rel_url.update_query(pageToken=token)
            headers[hdrs.LINK] = f'<{next_url}>; rel="next"'
        return web.json_response([task_json(t) for t in tasks], headers=headers)

    async def _list(
        self, query: task_service_pb2.ListTasksRequest, request: web.Request
    ) -> tuple[list[Any], str]:
        wanted = query.page_size or LIST_CAP
        tasks: list[Any] = []
        while True:
            query.page_size = min(wanted - len(tasks), MAX_PAGE_SIZE)
            response = await self._unary(self._stub.ListTasks, query, request)
            tasks.extend(response.tasks)
            token = str(response.next_page_token)
            if not token or len(tasks) >= wanted:
                return tasks, token
            query.page_token = token

    async def _unary(self, method: Any, message: Any, request: web.Request) -> Any:
        try:
            return await method(message, metadata=call_metadata(request), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise RestError.from_rpc(exc) from None
