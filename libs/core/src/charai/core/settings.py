"""Settings shared by every service: environment variables with the ``CHARAI_`` prefix.

Each service has one Settings object, read once at start in ``__main__``; a bad value stops
start-up with a message naming the variable.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ZHIPU_BASE_URL = "https://open.bigmodel.cn/api/paas/v4"


def _check_addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (got {value!r})")
    return value


class CommonSettings(BaseSettings):
    """Settings every charai process reads."""

    model_config = SettingsConfigDict(env_prefix="CHARAI_", extra="ignore", frozen=True)

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS with JetStream (comma-separated seeds)"
    )
    task_store_addr: str = "127.0.0.1:50052"
    data_dir: Path = Path("./.data")
    log_level: str = "info"
    log_format: str = "json"
    #: Stream and bucket replicas (3 on a NATS cluster).
    nats_replicas: int = Field(default=1, ge=1, le=5)
    #: Prefix of every NATS subject, stream and bucket, so two stacks can share one NATS.
    namespace: str = Field(default="charai", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    #: Shared secret that gateways and workers present to task_store (empty: internal auth off).
    internal_token: str = Field(default="", repr=False)
    #: Secret that signs media URLs (gateway) — also known to nobody else.
    media_signing_key: str = Field(default="", repr=False)
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    #: The image model; gateways and task_store check sizes against its documented bounds.
    image_model: str = "glm-image"
    #: HOST:PORT of this process's Prometheus ``/metrics`` (task_store, workers; empty: off).
    #: The gateway serves ``/metrics`` on its HTTP port instead.
    metrics_addr: str = ""

    @field_validator("task_store_addr")
    @classmethod
    def _task_store_addr(cls, value: str) -> str:
        # Gateways and workers may list several replicas: "host1:port,host2:port".
        for part in value.split(","):
            _check_addr(part.strip())
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, value: str) -> str:
        return _check_addr(value) if value else value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return value.lower()

    @property
    def nats_servers(self) -> list[str]:
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]


S = TypeVar("S", bound=BaseSettings)
_SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|URL", re.IGNORECASE)


def load(cls: type[S], **overrides: Any) -> S:
    """Builds the settings, or exits with a message naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = []
        for err in exc.errors():
            name = prefix + "_".join(str(p) for p in err["loc"]).upper()
            raw = os.environ.get(name)
            # Never echo what may be a secret (keys, tokens, URLs with passwords).
            shown = "<unset>" if raw is None else ("<hidden>" if _SECRETISH.search(name) else repr(raw))
            lines.append(f"  {name}={shown}: {err['msg']}")
        sys.stderr.write(f"charai: bad setting(s), cannot start:\n{chr(10).join(lines)}\n")
        raise SystemExit(2) from None


def check_addr(value: str) -> str:
    return _check_addr(value)
