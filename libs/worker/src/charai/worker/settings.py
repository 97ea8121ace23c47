"""Settings of the workers (env prefix ``CHARAI_``)."""

from __future__ import annotations

import os
import socket
from typing import Any

from charai.core.settings import DEFAULT_BASE_URLS, CommonSettings, provider_default
from pydantic import Field, SecretStr, model_validator


class WorkerSettings(CommonSettings):
    #: JetStream redelivers a job not acknowledged (nor heartbeated) within this time.
    ack_wait_seconds: float = Field(default=30.0, gt=0, le=86_400)  # JetStream holds nanoseconds
    max_deliver: int = Field(default=20, ge=1, le=1_000_000)
    #: Fetch media from loopback/private addresses (only for the local emulator).
    provider_allow_private_urls: bool = False
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    long_poll_seconds: float = Field(default=5.0, gt=0)
    #: At most one progress report per job per this many seconds; reports superseded meanwhile
    #: are never sent (0: every report goes out, still without blocking the handler).
    progress_coalesce_seconds: float = Field(default=0.05, ge=0, le=10)
    #: task_store calls (claims, progress, outcomes) in flight at once from one worker process.
    store_calls_in_flight: int = Field(default=64, ge=1, le=10_000)
    #: One adaptive limit and one breaker per provider credential, shared by every worker through
    #: the NATS KV bucket ``<namespace>-providers``; false: each process adapts on its own, no breaker.
    provider_shared_limits: bool = True
    #: A worker's slots of the shared limit go back to the others this long after its last
    #: heartbeat (it crashed); it writes one every third of this.
    provider_lease_seconds: float = Field(default=15.0, ge=0.3, le=3600)
    #: Seconds the breaker stays open after an auth or quota refusal before one call probes
    #: the provider again; doubled after each failed probe, up to the max.
    provider_breaker_backoff_seconds: float = Field(default=30.0, gt=0, le=86_400)
    provider_breaker_max_backoff_seconds: float = Field(default=900.0, gt=0, le=86_400)


class ImageWorkerSettings(WorkerSettings):
    #: Default: the provider's own API (Zhipu v4, or ``https://api.openai.com/v1`` for openai).
    image_api_base_url: str = ""
    image_api_key: SecretStr = SecretStr("")
    image_concurrency: int = Field(default=64, ge=1, le=10_000)
    image_timeout_seconds: float = Field(default=180.0, gt=0)
    #: "auto" uses GLM-Image's async endpoint (real progress); "sync" always the plain endpoint.
    image_async_mode: str = Field(default="auto", pattern="^(auto|async|sync)$")
    image_poll_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        return provider_default(data, "image_provider", "image_api_base_url", DEFAULT_BASE_URLS)


class TtsWorkerSettings(WorkerSettings):
    #: Default: the provider's own API (Zhipu v4, or ``https://api.openai.com/v1`` for openai).
    tts_api_base_url: str = ""
    tts_api_key: SecretStr = SecretStr("")
    tts_concurrency: int = Field(default=64, ge=1, le=10_000)
    tts_timeout_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        return provider_default(data, "tts_provider", "tts_api_base_url", DEFAULT_BASE_URLS)
