"""Gateway settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

import re
from pathlib import Path

from charai.core.settings import CommonSettings, check_addr
from pydantic import Field, SecretStr, field_validator, model_validator

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
    #: CreateTask calls a tenant may make per second, sustained (0: no limit, e.g. benchmarks).
    submit_rate_per_tenant: float = Field(default=50.0, ge=0)
    #: How many CreateTask calls a tenant may make at once above the sustained rate.
    submit_burst_per_tenant: int = Field(default=200, ge=1)
    #: Tenants that may read queue statistics of every tenant (GetQueueStats). With auth off,
    #: every caller is the tenant "default".
    operator_tenants: str = "default"

    @property
    def operators(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.operator_tenants.split(",") if t.strip())

    #: PEM certificate (chain) and private key: with both set, the public gRPC and HTTP ports
    #: speak TLS only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

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

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CHARAI_TLS_CERT_FILE and CHARAI_TLS_KEY_FILE go together: set both or neither")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def cors_origin_list(self) -> list[str]:
        """The allow-list, normalised (no trailing slash, no blanks)."""
        return [o for o in (part.strip().rstrip("/") for part in self.cors_origins.split(",")) if o]

    def base_url(self, http_port: int) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = self.gateway_http_addr.rpartition(":")[0]
        return f"{'https' if self.tls else 'http'}://{host}:{http_port}"
