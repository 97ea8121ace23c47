"""Client of the internal task_store API, shared by gateways and workers."""

from __future__ import annotations

import json
from typing import Any

import grpc
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


class StoreClient:
    """A channel and stub to task_store; ``call_metadata`` carries the internal token."""

    def __init__(self, addr: str, token: str = "") -> None:
        self._channel = grpc.aio.insecure_channel(
            addr,
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
            ],
        )
        self.stub = store_service_pb2_grpc.TaskStoreServiceStub(self._channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._closed = False

    def kw(self, timeout: float | None = 10.0) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout}

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
