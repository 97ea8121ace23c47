"""Gateway settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from charai.core.settings import CommaList, CommonSettings, check_addr, parse_api_keys, split_commas
from charai.core.validation import whole_number
from pydantic import BeforeValidator, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

#: Where ``make console`` puts the built console (next to this package; gitignored).
DEFAULT_CONSOLE_DIR = Path(__file__).resolve().parent / "console_dist"
#: The most gateway processes one ``CHARAI_GATEWAY_PROCESSES`` may ask for.
MAX_GATEWAY_PROCESSES = 256
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. ``taskset``; a container's CPU
    quota is not read), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Settings(CommonSettings):
    gateway_grpc_addr: str = "127.0.0.1:50051"
    gateway_http_addr: str = "127.0.0.1:8080"
    #: Processes serving the public ports together (SO_REUSEPORT: the kernel spreads connections
    #: over them), each with its own event fan-out; ``0`` or ``auto``: one per CPU core
    #: (:func:`cpu_cores`). Parsed into the count, at least 1 (see :mod:`charai.gateway.processes`).
    gateway_processes: int = 1
    #: How media URLs are written (default: http://<gateway HTTP address>).
    public_base_url: str = ""
    #: ``token=tenant`` pairs, comma-separated. Unset: auth off, loopback only.
    api_keys: SecretStr = SecretStr("")
    #: A file with one ``token=tenant`` per line (``#`` comments allowed).
    api_keys_file: Path | None = None
    #: Both of the above, parsed: (token, tenant) pairs (:attr:`client_tokens`).
    _client_tokens: tuple[tuple[SecretStr, str], ...] = PrivateAttr(default=())
    #: Lifetime of a media URL in seconds; 0 (the default): media URLs never expire (apps store
    #: them); otherwise at least 60.
    media_url_ttl: int = Field(default=0, ge=0)
    #: Secrets that sign access tokens, comma-separated: the first signs, all verify (rotate by
    #: putting a new one first and dropping the old one after the longest token lifetime).
    #: Unset: one generated into the data dir (replicas behind one load balancer need the setting).
    access_token_keys: SecretStr = SecretStr("")
    #: The longest lifetime CreateAccessToken may give a token.
    access_token_max_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    #: An idle watch stream carries a heartbeat event this often.
    watch_heartbeat_seconds: float = Field(default=5.0, gt=0)
    max_watch_streams: int = Field(default=10_000, ge=1)
    max_watch_streams_per_tenant: int = Field(default=2_000, ge=1)
    #: Browser origins allowed to call gRPC-web and REST from another origin, comma-separated
    #: (``https://app.example.com,http://localhost:5173``; ``*`` = any origin, without
    #: credentials), kept without a trailing slash. Empty: no cross-origin access (the console
    #: at ``/`` is same-origin).
    cors_origins: CommaList = ()
    #: The built task console served at ``/`` (default: ``console_dist`` next to the package).
    console_dir: Path = DEFAULT_CONSOLE_DIR
    #: CreateTask calls a tenant may make per second, sustained (0: no limit, e.g. benchmarks).
    submit_rate_per_tenant: float = Field(default=50.0, ge=0)
    #: How many CreateTask calls a tenant may make at once above the sustained rate.
    submit_burst_per_tenant: int = Field(default=200, ge=1)
    #: Tenants that may read queue statistics of every tenant (GetQueueStats), comma-separated.
    #: With auth off, every caller is the tenant "default".
    operator_tenants: Annotated[frozenset[str], NoDecode, BeforeValidator(split_commas)] = frozenset(
        {"default"}
    )

    #: Each tenant's default webhook endpoint, for tasks created without a webhook:
    #: ``tenant=https://…`` pairs, comma-separated (events: the terminal ones).
    tenant_webhooks: CommaList = ()

    #: PEM certificate (chain) and private key: with both set, the public gRPC and HTTP ports
    #: speak TLS only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("gateway_grpc_addr", "gateway_http_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        return check_addr(value)

    @field_validator("gateway_processes", mode="before")
    @classmethod
    def _processes(cls, value: object) -> int:
        text = str(value).strip().lower()
        if text == "auto":
            return cpu_cores()
        if isinstance(value, bool) or not whole_number(text) or int(text) > MAX_GATEWAY_PROCESSES:
            most = MAX_GATEWAY_PROCESSES
            raise ValueError(f"must be a number of processes (1 to {most}), or 0 / auto for one per CPU core")
        return int(text) or cpu_cores()

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        origins = tuple(o for o in (part.rstrip("/") for part in value) if o)
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port] or *")
        return origins

    @field_validator("tenant_webhooks")
    @classmethod
    def _tenant_webhooks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pair in value:
            tenant, _, url = pair.partition("=")
            if not tenant.strip() or not url.strip().startswith(("http://", "https://")):
                raise ValueError(f"{pair!r} is not tenant=http(s)://host/path")
        return value

    def default_webhooks(self) -> dict[str, str]:
        """Tenant -> default webhook URL."""
        return {t.strip(): u.strip() for t, _, u in (pair.partition("=") for pair in self.tenant_webhooks)}

    @field_validator("access_token_keys")
    @classmethod
    def _access_token_keys(cls, value: SecretStr) -> SecretStr:
        keys = [k.strip() for k in value.get_secret_value().split(",") if k.strip()]
        if any(len(k) < 32 for k in keys):  # RFC 7518 3.2: an HS256 key of at least 256 bits
            raise ValueError("each key must be at least 32 characters (e.g. openssl rand -base64 32)")
        return value

    @field_validator("media_url_ttl")
    @classmethod
    def _media_url_ttl(cls, value: int) -> int:
        if 0 < value < 60:
            raise ValueError("must be 0 (media URLs never expire) or at least 60 seconds")
        return value

    @model_validator(mode="after")
    def _metrics_ports_fit(self) -> Settings:
        port = int(self.metrics_addr.rpartition(":")[2] or 0)
        if port and port + self.gateway_processes - 1 > 65535:
            raise ValueError(
                f"CHARAI_METRICS_ADDR: gateway process i serves /metrics on port {port} + i, and "
                f"{self.gateway_processes} processes (CHARAI_GATEWAY_PROCESSES) go past 65535"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CHARAI_TLS_CERT_FILE and CHARAI_TLS_KEY_FILE go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _client_tokens_or_loopback(self) -> Settings:
        """Parses the client tokens, and refuses a non-loopback address without any: with auth
        off every caller is tenant "default", which is only safe when nobody else can connect."""
        file_text = ""
        if self.api_keys_file is not None:
            try:
                file_text = self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(
                    f"CHARAI_API_KEYS_FILE: cannot read {self.api_keys_file} ({exc.strerror})"
                ) from None
        pairs = parse_api_keys(self.api_keys.get_secret_value(), file_text)
        if any(not token or not tenant for token, tenant in pairs):
            # Never echo the entry: it may be a token without its "=tenant".
            raise ValueError("CHARAI_API_KEYS / CHARAI_API_KEYS_FILE entries must look like token=tenant")
        owners: dict[str, str] = {}
        for token, tenant in pairs:
            if owners.setdefault(token, tenant) != tenant:  # the last entry won, silently
                raise ValueError(
                    "CHARAI_API_KEYS / CHARAI_API_KEYS_FILE give one token to two tenants"
                    f" ({owners[token]} and {tenant}); each token names one tenant"
                )
        self._client_tokens = tuple((SecretStr(token), tenant) for token, tenant in pairs)
        if not pairs:
            for name, addr in (
                ("CHARAI_GATEWAY_GRPC_ADDR", self.gateway_grpc_addr),
                ("CHARAI_GATEWAY_HTTP_ADDR", self.gateway_http_addr),
            ):
                if not is_loopback(addr):
                    raise ValueError(
                        f"gateway: refusing to listen on {addr} ({name}) without client tokens; "
                        "set CHARAI_API_KEYS or CHARAI_API_KEYS_FILE, or listen on 127.0.0.1"
                    )
        return self

    @property
    def client_tokens(self) -> tuple[tuple[SecretStr, str], ...]:
        """(token, tenant) of every entry of ``CHARAI_API_KEYS`` and ``CHARAI_API_KEYS_FILE``;
        empty: auth off (and the gateway listens on loopback only)."""
        return self._client_tokens

    def derived_secrets(self) -> Iterator[str]:
        for token, _ in self._client_tokens:
            yield token.get_secret_value()

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def metrics_addr_of(self, process: int | None) -> str:
        """Where process ``process`` (0-based; None: the only one) serves ``/metrics`` of its own:
        ``CHARAI_METRICS_ADDR`` with the port moved up by the index, so the processes never
        collide (port 0: each binds a free one and logs it); '' when the setting is unset."""
        if not self.metrics_addr or not process:
            return self.metrics_addr
        host, _, port = self.metrics_addr.rpartition(":")
        return f"{host}:{int(port) + process}" if int(port) else self.metrics_addr

    def base_url(self, http_port: int) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = self.gateway_http_addr.rpartition(":")[0]
        return f"{'https' if self.tls else 'http'}://{host}:{http_port}"


def is_loopback(addr: str) -> bool:
    """Whether ``HOST:PORT`` listens on loopback only (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
