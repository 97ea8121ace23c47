"""gRPC plumbing shared by the servers: error translation, canonical log lines, health, reflection."""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from charai.core import tracing
from charai.core.errors import DOMAIN, CharaiError, LimitExceededError
from charai.core.storechannel import INTERNAL_MAX_MESSAGE_BYTES
from charai.core.validation import RequestInvalidError, Violation
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

log = structlog.get_logger("grpc")

#: The authenticated principal (tenant) of the current RPC, set by :class:`ServerInterceptor`.
principal: contextvars.ContextVar[str] = contextvars.ContextVar("principal", default="default")

#: The largest request message a public server takes (the gateway's gRPC port): a
#: BatchCreateTasks of 100 requests, each at its largest (a 16,000-byte prompt, 8 KiB of
#: metadata, ...), is about 3 MB. A larger one is refused by :class:`ServerInterceptor` with
#: RESOURCE_EXHAUSTED naming the limit (``ErrorInfo`` ``limit=message_bytes``, ``QuotaFailure``).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: What gRPC itself takes before :class:`ServerInterceptor` sees a request (beyond it gRPC
#: refuses the message with RESOURCE_EXHAUSTED and no details). A message is read whole before
#: anything looks at it, so this is what one call may make the gateway hold: kept near the limit.
GRPC_RECEIVE_BYTES = MAX_MESSAGE_BYTES + 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", GRPC_RECEIVE_BYTES),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Off: a second server on a taken port fails to start instead of silently sharing it (grpc's
    # default is on). Only the gateway's processes share their ports, on purpose (server_options).
    ("grpc.so_reuseport", 0),
]


def server_options(*, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """:data:`SERVER_OPTIONS`, with SO_REUSEPORT on when ``reuse_port``: for processes that bind
    the same port on purpose (``CHARAI_GATEWAY_PROCESSES``), the kernel spreading connections
    over them. Everywhere else it stays off, so two services never share a port by mistake."""
    return [(k, int(reuse_port) if k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]


def internal_server_options() -> list[tuple[str, Any]]:
    """:data:`SERVER_OPTIONS` with task_store's message limits
    (``storechannel.INTERNAL_MAX_MESSAGE_BYTES`` both ways; its interceptor takes the same)."""
    internal = {
        "grpc.max_receive_message_length": INTERNAL_MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": INTERNAL_MAX_MESSAGE_BYTES,
    }
    return [(k, internal.get(k, v)) for k, v in SERVER_OPTIONS]


def status_for(exc: BaseException) -> status_pb2.Status | None:
    """The google.rpc.Status for an exception a client may see, or None for a bug."""
    if isinstance(exc, RequestInvalidError):
        return _invalid_status(exc.violations)
    if isinstance(exc, grpc.aio.AioRpcError):
        return _upstream_status(exc)
    if isinstance(exc, CharaiError):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        details = [detail]
        # Errors may carry more google.rpc details (QuotaFailure, RetryInfo for a rate limit).
        extra: Sequence[ProtoMessage] = getattr(exc, "extra_details", ())
        for message in extra:
            packed = any_pb2.Any()
            packed.Pack(message)
            details.append(packed)
        return status_pb2.Status(code=exc.code.value[0], message=exc.message, details=details)
    return None


#: A status travels in HTTP/2 trailers, which gRPC clients refuse above 8 KiB in all (the message
#: percent-encoded, the details base64): a request bad in many fields is answered with the
#: violations that fit these budgets, in order, and the count of the others.
MESSAGE_BUDGET_BYTES = 1024
DETAILS_BUDGET_BYTES = 2048


def _invalid_status(violations: Sequence[Violation]) -> status_pb2.Status:
    """INVALID_ARGUMENT with a ``BadRequest`` naming the bad fields, within the budgets."""
    shown: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for v in violations:
        item = error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
        size += item.ByteSize() + 3  # + the field's tag and length
        if size > DETAILS_BUDGET_BYTES:
            break
        shown.append(item)
    hidden = len(violations) - len(shown)
    more = f" (and {hidden} more)" if hidden else ""
    summary = "; ".join(f"{v.field}: {v.description}" for v in shown)
    room = MESSAGE_BUDGET_BYTES - len(more.encode())
    if len(f"invalid request: {summary}".encode()) > room:
        clipped = f"invalid request: {summary}".encode()[: room - 3].decode("utf-8", "ignore")
        message = clipped + "..." + more
    else:
        message = f"invalid request: {summary}{more}"
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=shown))
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])


#: Codes of an internal call that a client may see as they are; anything else is our problem.
_PASS_THROUGH = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _upstream_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The status a client sees when a call to another charai service failed: the same code and
    details for client errors (e.g. NOT_FOUND from task_store), a plain UNAVAILABLE otherwise —
    never the internal call's debug string."""
    code = exc.code()
    if code in _PASS_THROUGH:
        try:
            rich = rpc_status.from_call(exc)  # type: ignore[arg-type]
        except ValueError:  # details of another code: e.g. an answer whose metadata was too large
            rich = None
        if rich is not None:
            return rich
        return status_pb2.Status(code=code.value[0], message=(exc.details() or code.name.lower())[:1000])
    log.warning("upstream_call_failed", code=code.name, details=exc.details())
    return status_pb2.Status(code=code_pb2.UNAVAILABLE, message="the task service is unavailable; try again")


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    status = status_for(exc)
    if status is None:
        raise exc
    await context.abort_with_status(rpc_status.to_status(status))


Handler = Callable[..., Any]


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """One behaviour for every RPC: bind log context, translate errors, one canonical log line.

    ``authenticate`` (optional) maps the invocation metadata to a principal or raises
    :class:`~charai.core.errors.UnauthenticatedError`; the result is bound as ``tenant``.

    Only ``skip_prefixes`` (health: load balancers and probes carry no token) bypass it.
    Reflection does not: it describes the whole API, so it sits behind the same authentication
    as every other RPC (with no tokens configured, ``authenticate`` lets everyone in anyway).

    Requests are decoded here, not by gRPC: bytes that are not the method's message (corrupt
    wire format, a string field with bad UTF-8) are the client's error, ``INVALID_ARGUMENT``,
    where gRPC itself would answer ``UNKNOWN`` with the decoder's exception in the message.

    Each method's wrapped handler is built once and kept (a method's handler is the same object
    call after call); what differs per call (the metadata) is read from the call's context.
    Building it per call cost more than everything the wrapper then does.
    """

    def __init__(
        self,
        authenticate: Callable[[dict[str, str], str], str] | None = None,
        skip_prefixes: Sequence[str] = ("/grpc.health.",),
        observe: Callable[[str, str, float], None] | None = None,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._authenticate = authenticate
        self._skip = tuple(skip_prefixes)
        #: A request message larger than this is refused, naming the limit (before anything else).
        self._max_request_bytes = max_request_bytes
        #: Called after each RPC with (method, code name, seconds): the metrics hook.
        self._observe = observe
        #: method -> (the handler gRPC found, its wrapped handler); one entry per served method.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = handler
        if not method.startswith(self._skip):
            scope = _RpcScope(method, self._authenticate, self._observe, self._max_request_bytes)
            wrapped = _wrap(handler, scope)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class MessageTooLargeError(LimitExceededError):
    """A request message over the server's limit: RESOURCE_EXHAUSTED with ``ErrorInfo``
    (``limit=message_bytes``, ``max_bytes``) and ``QuotaFailure``."""

    def __init__(self, size: int, limit: int) -> None:
        message = f"the request message is {size} bytes; at most {limit} are taken"
        super().__init__(message, limit="message_bytes", max_bytes=str(limit))
        violation = error_details_pb2.QuotaFailure.Violation(subject="request", description=message)
        self.extra_details: list[ProtoMessage] = [error_details_pb2.QuotaFailure(violations=[violation])]


@dataclasses.dataclass(frozen=True, slots=True)
class _RpcScope:
    """What every wrapped RPC does around its handler: :meth:`begin` (trace, log context,
    authentication) before it, :meth:`finish` (metrics hook, the canonical log line) after it."""

    method: str
    authenticate: Callable[[dict[str, str], str], str] | None
    observe: Callable[[str, str, float], None] | None
    max_request_bytes: int = MAX_MESSAGE_BYTES
    #: The method's short name, for the log context.
    rpc: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rpc", self.method.rsplit("/", 1)[-1])

    def check_size(self, raw: Any) -> None:
        """Refuses a request message over :attr:`max_request_bytes` (RESOURCE_EXHAUSTED naming
        the limit), first: as gRPC's own limit would, whoever sent it."""
        if isinstance(raw, bytes) and len(raw) > self.max_request_bytes:
            raise MessageTooLargeError(len(raw), self.max_request_bytes)

    def begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        # Continue the caller's W3C trace (or start one): it follows the task to the provider.
        traceparent = tracing.enter(metadata.get("traceparent", ""))
        trace_id = traceparent.split("-")[1]  # enter() returns a valid traceparent
        structlog.contextvars.bind_contextvars(rpc=self.rpc, trace_id=trace_id)
        if self.authenticate is None:
            return
        tenant = self.authenticate(metadata, self.method)
        principal.set(tenant)
        structlog.contextvars.bind_contextvars(tenant=tenant)

    def finish(self, start: float, code: str, extra: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - start
        if self.observe is not None:
            self.observe(self.method, code, elapsed)
        elapsed_ms = round(elapsed * 1000, 2)
        level = "warning" if code in {"INTERNAL", "UNKNOWN"} else "info"
        getattr(log, level)("rpc_finished", code=code, elapsed_ms=elapsed_ms, **extra)


def _wrap(handler: Any, scope: _RpcScope) -> Any:
    """The method handler with ``scope`` around it, for each kind of RPC charai serves."""
    decode = _decoder(handler.request_deserializer, scope.method)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(scope, handler.unary_unary, decode),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(scope.begin, scope.finish, handler.unary_stream, decode, scope.check_size),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        # Server reflection (a bidirectional stream): authenticated like the rest, answered
        # before the first request message is read.
        return grpc.stream_stream_rpc_method_handler(
            _streaming(scope.begin, scope.finish, handler.stream_stream, lambda requests: requests),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _unary(
    scope: _RpcScope, inner: Any, decode: Callable[[bytes], Any]
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """A unary method wrapped: decode the request, authenticate, translate errors, log once."""

    async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        start = time.perf_counter()
        code = "OK"
        try:
            scope.check_size(raw)
            scope.begin(context)
            return await inner(decode(raw), context)
        except BaseException as exc:
            code = _code_name(exc, context)
            await abort_for(context, exc)
            raise
        finally:
            scope.finish(start, code, {})

    return unary


def _streaming(
    begin: Callable[[grpc.aio.ServicerContext[Any, Any]], None],
    finish: Callable[[float, str, dict[str, Any]], None],
    inner: Any,
    prepare: Callable[[Any], Any],
    check: Callable[[Any], None] | None = None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    """A streaming method wrapped like a unary one: authenticate, translate errors, log once."""

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        start = time.perf_counter()
        code = "OK"
        sent = 0
        try:
            if check is not None:
                check(request)
            begin(context)
            async for item in inner(prepare(request), context):
                sent += 1
                yield item
        except BaseException as exc:
            code = _code_name(exc, context)
            await abort_for(context, exc)
            raise
        finally:
            finish(start, code, {"messages": sent})

    return stream


def _decoder(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    """The method's request decoder, raising :class:`RequestInvalidError` on bytes that are not
    its message (so the client learns it sent garbage, and nothing of the decoder leaks)."""
    if deserialize is None:
        return lambda raw: raw

    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else f"{method.rsplit('/', 1)[-1]} request"
    description = f"is not a {name} (corrupt wire format, or a string that is not UTF-8)"

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (DecodeError, UnicodeDecodeError, ValueError):
            raise RequestInvalidError([Violation("request", description)]) from None

    return decode


def _code_name(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    import asyncio

    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    status = status_for(exc)
    if status is not None:
        return grpc.StatusCode(_code_tuple(status.code)).name
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
    log.exception("rpc_crashed")
    return "INTERNAL"


def _code_tuple(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


async def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:  # type: ignore[name-defined]
    """Adds grpc.health.v1 (every service SERVING) and server reflection to ``server``."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in (*service_names, ""):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return servicer
