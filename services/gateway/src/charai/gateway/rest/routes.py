"""The REST routes themselves: each a TaskService call over the loopback channel."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import hdrs, web
from charai.gateway.rest.errors import RestError
from charai.gateway.rest.parsing import create_request, list_request
from charai.gateway.rest.views import sse_block, task_json
from charai.tasks.v1 import task_service_pb2, task_service_pb2_grpc

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

#: A unary call's deadline (the gateway itself gives task_store at most 30 s).
CALL_TIMEOUT = 30.0
#: Largest JSON body (the HTTP app's ``client_max_size``).
MAX_BODY_BYTES = 1024 * 1024
#: How long a browser's EventSource waits before it reconnects with ``Last-Event-ID``.
SSE_RETRY_MS = 1000
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+\-]+\+)?json$")


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
