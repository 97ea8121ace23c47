"""REST errors: a gRPC status as the HTTP status and ``{"error": …}`` body the seed's client reads."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import hdrs, web
from charai.taskapi import error_details

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
        details = error_details(exc)
        violations = [(json_field(field), description) for field, description in details.field_violations]
        message = exc.details() or exc.code().name.lower()
        if violations:
            message = "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations)
        return cls(exc.code(), message, violations, reason=details.reason, retry_after=details.retry_after)

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


@web.middleware
async def json_not_found(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An ``/api/`` path no route has, or a method its route does not take, answered like every
    other REST error (``{"error": …}``, 404 or 405 with ``Allow``), not aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        if not request.path.startswith("/api/"):
            raise
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = RestError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{request.method} is not a method of {request.path} ({allowed})",
            http_status=405,
        ).response()
        response.headers[hdrs.ALLOW] = allowed
        return response
    except web.HTTPNotFound:
        if not request.path.startswith("/api/"):
            raise
        return RestError(
            grpc.StatusCode.NOT_FOUND, f"no such route: {request.method} {request.path}"
        ).response()


_BATCH_ITEM = re.compile(r"^(requests\[\d+\])\.(.+)$")


def json_field(path: str) -> str:
    """A violation's proto field path in the seed's JSON terms: ``image.character_id`` →
    ``payload.characterId``, ``request_id`` → ``requestId``; metadata keys stay as they are."""
    batch = _BATCH_ITEM.match(path)  # requests[2].image.prompt -> requests[2].payload.prompt
    if batch:
        return f"{batch.group(1)}.{json_field(batch.group(2))}"
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
