"""Server-Sent Events: one task's events (``GET /api/tasks/{id}/events``, WatchTask) and every
event of the tasks a filter matches (``GET /api/tasks/events``, WatchTasks: the seed's WebSocket
listener as one EventSource).

Both resume with ``Last-Event-ID`` (an EventSource sends it by itself when it reconnects) or
``?after=``, and accept ``?access_token=`` because EventSource cannot send headers. The token in
the URL is never logged: the HTTP server keeps no access log, and the responses tell the browser
not to send the URL on as a referrer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import hdrs, web
from charai.core.validation import whole_number
from charai.gateway.rest.calls import call_metadata
from charai.gateway.rest.errors import RestError
from charai.gateway.rest.parsing import watch_request
from charai.gateway.rest.views import sse_block
from charai.tasks.v1 import task_pb2, task_service_pb2

if TYPE_CHECKING:
    from charai.tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

#: How long a browser's EventSource waits before it reconnects with ``Last-Event-ID``.
SSE_RETRY_MS = 1000
#: What the SSE routes ask of the watch streams they read (``max_events_per_message``): a stream
#: that fell behind hands over what it has queued in one message, written in one socket write.
SSE_EVENTS_PER_WRITE = 256
_HEADERS = {
    hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
    hdrs.CACHE_CONTROL: "no-cache, no-store",
    "X-Accel-Buffering": "no",
    "Referrer-Policy": "no-referrer",
}


def resume_after(request: web.Request) -> int:
    """The sequence to resume after: ``Last-Event-ID``, else ``?after=``, else 0."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    field = "Last-Event-ID" if "Last-Event-ID" in request.headers else "after"
    if not whole_number(raw.strip()):
        raise RestError.invalid([(field, "must be an event id (a whole number)")])
    after = int(raw.strip())
    if after >= 2**63:
        raise RestError.invalid([(field, "is too large")])
    return after


class EventStreams:
    """The two SSE routes over TaskService's watch streams."""

    def __init__(self, stub: TaskServiceAsyncStub) -> None:
        self._stub = stub

    async def one(self, request: web.Request) -> web.StreamResponse:
        """WatchTask as Server-Sent Events, ending after the terminal event. A reconnecting
        EventSource gets exactly the later events; when there are none and the task has ended,
        204 tells it to stop reconnecting."""
        try:
            after = resume_after(request)
        except RestError as exc:
            return exc.response()
        watch = task_service_pb2.WatchTaskRequest(
            id=request.match_info["id"], after_sequence=after, max_events_per_message=SSE_EVENTS_PER_WRITE
        )
        call = self._stub.WatchTask(watch, metadata=call_metadata(request, query_token=True))
        return await self._serve(request, call, many=False)

    async def many(self, request: web.Request) -> web.StreamResponse:
        """WatchTasks as Server-Sent Events: every event of the tasks matching ``metadata.<key>``
        (any number), ``type`` and ``status`` that the caller may see (no filter: all of them),
        until the client goes away. Heartbeats carry the resume point (see ``sse_block``)."""
        try:
            watch, status = watch_request(list(request.query.items()), resume_after(request))
        except RestError as exc:
            return exc.response()
        watch.max_events_per_message = SSE_EVENTS_PER_WRITE
        call = self._stub.WatchTasks(watch, metadata=call_metadata(request, query_token=True))
        return await self._serve(request, call, many=True, status=status)

    async def _serve(
        self, request: web.Request, call: Any, *, many: bool, status: int = 0
    ) -> web.StreamResponse:
        try:
            return await self._stream(request, call, many, status)
        except asyncio.CancelledError:
            # The page closed the stream: release the server-side watcher at once.
            call.cancel()
            raise

    async def _stream(self, request: web.Request, call: Any, many: bool, status: int) -> web.StreamResponse:
        events = _kept(call, status)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            return web.Response(status=204)
        except grpc.aio.AioRpcError as exc:
            return RestError.from_rpc(exc).response()
        response = web.StreamResponse(status=200, headers=_HEADERS)
        try:
            await response.prepare(request)
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode() + _blocks(first, many))
            try:
                async for group in events:
                    await response.write(_blocks(group, many))
            except grpc.aio.AioRpcError as exc:
                error = RestError.from_rpc(exc)
                body = {"code": error.code.name, "message": error.message}
                if error.reason:  # e.g. ACCESS_TOKEN_EXPIRED, as the REST error bodies name it
                    body["reason"] = error.reason
                data = json.dumps({"error": body})
                await response.write(f"event: error\ndata: {data}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            call.cancel()
        return response


def _blocks(events: list[task_pb2.TaskEvent], many: bool) -> bytes:
    """The SSE blocks of events that arrived in one stream message, for one socket write."""
    return b"".join(sse_block(event, many=many) for event in events)


async def _kept(call: Any, status: int) -> AsyncIterator[list[task_pb2.TaskEvent]]:
    """The events of each stream message (never an empty list); with ``status``, only those of
    tasks in that status (and heartbeats)."""
    async for message in call:
        kept = [
            event
            for event in (message.events or [message.event])
            if not status or event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT or event.task.status == status
        ]
        if kept:
            yield kept
