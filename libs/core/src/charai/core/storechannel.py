"""How a process reaches task_store: the channel's target and service config, and what every
call carries (:class:`CallDefaults`: the internal bearer token, the caller's trace and a default
deadline), added by client interceptors on the channel. Used by :mod:`charai.core.storeclient`.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from charai.core import tracing

#: The largest message either way between task_store and its callers (gateways, workers): an
#: ``Exchange`` carries up to ``coalesce.MAX_BATCH_BYTES`` of commands, or one larger command
#: alone (a public BatchCreateTasks, up to ``grpcsupport.MAX_MESSAGE_BYTES``), and its answers
#: echo the tasks. task_store's server takes the same (``grpcsupport.internal_server_options``).
INTERNAL_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: The deadline of a call whose caller gave none.
DEFAULT_TIMEOUT = 10.0

# Calls wait for task_store to be reachable (it may be restarting) and are retried on UNAVAILABLE.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "charai.store.v1.TaskStoreService"}],
                "waitForReady": True,
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def addresses(addr: str | Sequence[str]) -> list[str]:
    """The ``host:port`` entries of ``CHARAI_TASK_STORE_ADDR`` (a tuple, or one comma-separated string)."""
    given = addr.split(",") if isinstance(addr, str) else addr
    return [p.strip() for p in given if p.strip()]


def channel_target(addr: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for ``CHARAI_TASK_STORE_ADDR`` (the settings' tuple, or one string, which
    may list several separated by commas): one ``host:port``, or several (replicas), resolved once,
    at start, into an ``ipv4:``/``ipv6:`` address list that the round_robin policy balances over;
    returns (target, balanced)."""
    parts = addresses(addr)
    if len(parts) <= 1:
        return (parts[0] if parts else ""), False
    v4: list[str] = []
    v6: list[str] = []
    for part in parts:
        host, _, port = part.rpartition(":")
        host = host.strip("[]")
        for family, *_, sockaddr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
    if v4:
        return "ipv4:" + ",".join(dict.fromkeys(v4)), True
    return "ipv6:" + ",".join(dict.fromkeys(v6)), True


class CallDefaults:
    """What every call to task_store carries, added by a client interceptor.

    * ``authorization: Bearer <internal token>`` (when there is a token);
    * ``traceparent``: the trace of the work the call is part of (``charai.core.tracing.current``),
      so task_store's logs and the events it publishes join it;
    * a deadline of ``timeout`` seconds when the caller set none (an explicit one is kept).

    Cheap on purpose: the headers go into the call's own metadata (grpc.aio makes a fresh one
    per call), and the call details are copied only to set the default deadline.
    """

    __slots__ = ("_authorization", "_timeout")

    def __init__(self, token: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
        self._authorization = f"Bearer {token}" if token else ""
        self._timeout = timeout

    @property
    def stream_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a long-lived call carries (no deadline, and each message has its own trace)."""
        return (("authorization", self._authorization),) if self._authorization else ()

    def apply(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """``details`` with the headers added (to its own metadata, in place: StoreClient's methods
        never pass metadata, so grpc.aio made it for this call) and the default deadline."""
        metadata = details.metadata
        if metadata is None:
            metadata = grpc.aio.Metadata()
        if self._authorization:
            metadata.add("authorization", self._authorization)
        traceparent = tracing.current.get()
        if traceparent:
            metadata.add("traceparent", traceparent)
        if details.timeout is not None and metadata is details.metadata:
            return details
        return grpc.aio.ClientCallDetails(
            details.method,
            self._timeout if details.timeout is None else details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """These defaults as grpc.aio client interceptors, unary-unary and unary-stream (a
        channel files each interceptor object under one kind of call only)."""
        return [_UnaryUnaryDefaults(self), _UnaryStreamDefaults(self)]


class _UnaryUnaryDefaults(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details), request)


class _UnaryStreamDefaults(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details), request)
