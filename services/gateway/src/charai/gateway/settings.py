"""Gateway settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

from pathlib import Path

from charai.core.settings import CommonSettings, check_addr
from pydantic import Field, SecretStr, field_validator


class Settings(CommonSettings):
    gateway_grpc_addr: str = "127.0.0.1:50051"
    gateway_http_addr: str = "127.0.0.1:8080"
    #: How media URLs are written (default: http://<gateway HTTP address>).
    public_base_url: str = ""
    #: ``token=tenant`` pairs, comma-separated. Unset: auth off, loopback only.
    api_keys: SecretStr = SecretStr("")
    #: A file with one ``token=tenant`` per line (``#`` comments allowed).
    api_keys_file: Path | None = None
    media_url_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    #: An idle watch stream carries a heartbeat event this often.
    watch_heartbeat_seconds: float = Field(default=5.0, gt=0)
    max_watch_streams: int = Field(default=10_000, ge=1)
    max_watch_streams_per_tenant: int = Field(default=2_000, ge=1)

    @field_validator("gateway_grpc_addr", "gateway_http_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        return check_addr(value)

    def base_url(self, http_port: int) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = self.gateway_http_addr.rpartition(":")[0]
        return f"http://{host}:{http_port}"
