"""Python client of charai's TaskService (gRPC)."""

from charai.client.client import CharaiClient, CharaiError, WatchResumeError

__all__ = ["CharaiClient", "CharaiError", "WatchResumeError"]
