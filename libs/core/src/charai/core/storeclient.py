"""Client of the internal task_store API, shared by gateways and workers."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import grpc
from charai.core import tracing
from charai.store.v1 import store_service_pb2_grpc

# Calls wait for task_store to be reachable (it may be restarting) and are retried on UNAVAILABLE.
_SERVICE_CONFIG = json.dumps(
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


def channel_target(addr: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for ``CHARAI_TASK_STORE_ADDR`` (the settings' tuple, or one string, which
    may list several separated by commas): one ``host:port``, or several (replicas), resolved once,
    at start, into an ``ipv4:``/``ipv6:`` address list that the round_robin policy balances over;
    returns (target, balanced)."""
    given = addr.split(",") if isinstance(addr, str) else addr
    parts = [p.strip() for p in given if p.strip()]
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


class StoreClient:
    """A channel and stub to task_store; ``call_metadata`` carries the internal token."""

    def __init__(self, addr: str | Sequence[str], token: str = "") -> None:
        target, balanced = channel_target(addr)
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if balanced:
            # Several task_store replicas: spread calls, and route around one that is down
            # (its subchannel leaves the pick list), so a worker never stalls on a dead replica.
            options.append(("grpc.lb_policy_name", "round_robin"))
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = store_service_pb2_grpc.TaskStoreServiceStub(self._channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._closed = False

    def kw(self, timeout: float | None = 10.0) -> dict[str, Any]:
        traceparent = tracing.current.get()
        metadata = (*self.metadata, ("traceparent", traceparent)) if traceparent else self.metadata
        return {"metadata": metadata, "timeout": timeout}

    async def serving(self, timeout: float = 2.0) -> bool:
        """Whether task_store answers its gRPC health check with SERVING (it reports NOT_SERVING
        while its own dependencies are away), for the callers' health watchers."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
