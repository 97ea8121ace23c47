"""Webhook sender settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

import os
import socket

from charai.core.settings import CommonSettings
from pydantic import Field, field_validator


class SenderSettings(CommonSettings):
    #: Deliveries posted at once by this process.
    webhook_concurrency: int = Field(default=64, ge=1, le=10_000)
    #: Attempts in flight to one receiver (a URL's host and port) at most, unless the receiver has
    #: answered within 2 s lately; the deliveries beyond wait in JetStream (0: no bound).
    webhook_receiver_concurrency: int = Field(default=32, ge=0, le=10_000)
    #: Per attempt: connect, send and read the answer.
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=120)
    #: Post to loopback/private addresses (link-local and cloud metadata never).
    webhook_allow_private_urls: bool = False
    #: JetStream redelivers a delivery job not acknowledged within this time (a dead sender).
    webhook_ack_wait_seconds: float = Field(default=60.0, gt=0, le=86_400)
    sender_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: Where media URLs in payloads point: the gateway's public URL (unset: http:// and
    #: ``CHARAI_GATEWAY_HTTP_ADDR``, as the gateway itself would say on loopback).
    public_base_url: str = ""
    gateway_http_addr: str = "127.0.0.1:8080"
    #: Lifetime of media URLs in payloads (0: never expire; the gateway's setting).
    media_url_ttl: int = Field(default=0, ge=0)

    @field_validator("media_url_ttl")
    @classmethod
    def _media_url_ttl(cls, value: int) -> int:
        if 0 < value < 60:  # as the gateway checks it
            raise ValueError("must be 0 (media URLs never expire) or at least 60 seconds")
        return value

    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.gateway_http_addr}").rstrip("/")
