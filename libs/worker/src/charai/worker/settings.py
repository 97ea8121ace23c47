"""Settings of the workers (env prefix ``CHARAI_``)."""

from __future__ import annotations

import os
import socket

from charai.core.settings import ZHIPU_BASE_URL, CommonSettings
from pydantic import Field, SecretStr


class WorkerSettings(CommonSettings):
    #: JetStream redelivers a job not acknowledged (nor heartbeated) within this time.
    ack_wait_seconds: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=20, ge=1)
    #: Fetch media from loopback/private addresses (only for the local emulator).
    provider_allow_private_urls: bool = False
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    long_poll_seconds: float = Field(default=5.0, gt=0)
    #: At most one progress report per job per this many seconds; reports superseded meanwhile
    #: are never sent (0: every report goes out, still without blocking the handler).
    progress_coalesce_seconds: float = Field(default=0.05, ge=0, le=10)
    #: task_store calls (claims, progress, outcomes) in flight at once from one worker process.
    store_calls_in_flight: int = Field(default=64, ge=1, le=10_000)


class ImageWorkerSettings(WorkerSettings):
    image_api_base_url: str = ZHIPU_BASE_URL
    image_api_key: SecretStr = SecretStr("")
    image_concurrency: int = Field(default=64, ge=1, le=10_000)
    image_timeout_seconds: float = Field(default=180.0, gt=0)
    #: "auto" uses GLM-Image's async endpoint (real progress); "sync" always the plain endpoint.
    image_async_mode: str = Field(default="auto", pattern="^(auto|async|sync)$")
    image_poll_seconds: float = Field(default=1.0, gt=0)


class TtsWorkerSettings(WorkerSettings):
    tts_api_base_url: str = ZHIPU_BASE_URL
    tts_api_key: SecretStr = SecretStr("")
    tts_model: str = "glm-tts"
    tts_concurrency: int = Field(default=64, ge=1, le=10_000)
    tts_timeout_seconds: float = Field(default=60.0, gt=0)
