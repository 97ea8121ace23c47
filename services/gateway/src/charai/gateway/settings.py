"""Gateway settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

import re
from pathlib import Path

from charai.core.settings import CommonSettings, check_addr
from pydantic import Field, SecretStr, field_validator

#: Where ``make console`` puts the built console (next to this package; gitignored).
DEFAULT_CONSOLE_DIR = Path(__file__).resolve().parent / "console_dist"
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


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
    #: Browser origins allowed to call gRPC-web and REST from another origin, comma-separated
    #: (``https://app.example.com,http://localhost:5173``; ``*`` = any origin, without
    #: credentials). Empty: no cross-origin access (the console at ``/`` is same-origin).
    cors_origins: str = ""
    #: The built task console served at ``/`` (default: ``console_dist`` next to the package).
    console_dir: Path = DEFAULT_CONSOLE_DIR

    @field_validator("gateway_grpc_addr", "gateway_http_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        return check_addr(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in (part.strip().rstrip("/") for part in value.split(",")):
            if origin and origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port] or *")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        """The allow-list, normalised (no trailing slash, no blanks)."""
        return [o for o in (part.strip().rstrip("/") for part in self.cors_origins.split(",")) if o]

    def base_url(self, http_port: int) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = self.gateway_http_addr.rpartition(":")[0]
        return f"http://{host}:{http_port}"
