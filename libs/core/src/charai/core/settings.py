"""Settings shared by every service: environment variables with the ``CHARAI_`` prefix.

Each service has one Settings object, read once at start in ``__main__``; a bad value stops
start-up with a message naming the variable (never echoing a secret).

One home per fact: every value is parsed here, into the type the code uses. Lists are
comma-separated strings in the environment (``CHARAI_NATS_URL=nats://a:4222,nats://b:4222``) and
tuples here (:data:`CommaList`); secrets are :class:`pydantic.SecretStr`, so a settings object
printed or logged by mistake shows ``**********``, and :meth:`CommonSettings.secret_values` hands
their values to the log scrubber.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

from charai.core.validation import whole_number
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ZHIPU_BASE_URL = "https://open.bigmodel.cn/api/paas/v4"
#: The event loops a service may run on (``CHARAI_EVENT_LOOP``).
EventLoop = Literal["uvloop", "asyncio"]


def _check_addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not host
        or not whole_number(port)
        or not 0 <= int(port) <= 65535
        or any(c.isspace() or not c.isprintable() for c in host)
    ):
        raise ValueError(f"must be HOST:PORT (got {value!r})")
    return value


def check_addr(value: str) -> str:
    """``value`` when it is ``HOST:PORT``; ValueError otherwise."""
    return _check_addr(value)


def split_commas(value: Any) -> Any:
    """``"a, b,,c"`` → ``("a", "b", "c")``; any other value (a list given in code) passes through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


#: A comma-separated list in the environment, a tuple of non-blank strings in code.
#: ``NoDecode``: pydantic-settings would otherwise expect JSON for a sequence field.
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(split_commas)]


def _event_loop(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower() or "uvloop"
    return value


#: The provider API dialects (``CHARAI_IMAGE_PROVIDER``, ``CHARAI_TTS_PROVIDER``).
Provider = Literal["zhipu", "openai"]
#: The model used when ``CHARAI_IMAGE_MODEL`` is unset, per provider.
DEFAULT_IMAGE_MODELS = {"zhipu": "glm-image", "openai": "gpt-image-1"}
#: The model used when ``CHARAI_TTS_MODEL`` is unset, per provider.
DEFAULT_TTS_MODELS = {"zhipu": "glm-tts", "openai": "gpt-4o-mini-tts"}
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: The provider's base URL when ``CHARAI_IMAGE_API_BASE_URL`` / ``CHARAI_TTS_API_BASE_URL`` is unset.
DEFAULT_BASE_URLS = {"zhipu": ZHIPU_BASE_URL, "openai": OPENAI_BASE_URL}


def _provider(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower() or "zhipu"
    return value


def provider_default(data: Any, provider_field: str, field: str, defaults: dict[str, str]) -> Any:
    """Fills ``data[field]`` (a settings input dict) with ``defaults[provider]`` when it is unset or
    blank, so a setting's default follows the configured provider (``CHARAI_IMAGE_PROVIDER=openai``
    alone switches the model and base URL too). An unknown provider is left for its own check."""
    if isinstance(data, dict) and not str(data.get(field) or "").strip():
        provider = _provider(data.get(provider_field) or "zhipu")
        if provider in defaults:
            return {**data, field: defaults[provider]}
    return data


class CommonSettings(BaseSettings):
    """Settings every charai process reads."""

    # No infinite durations or counts (``inf`` passed ``gt=0`` and overflowed where it was used).
    model_config = SettingsConfigDict(env_prefix="CHARAI_", extra="ignore", frozen=True, allow_inf_nan=False)

    #: NATS with JetStream: one URL or several seeds, comma-separated.
    nats_url: Annotated[CommaList, Field(min_length=1)] = ("nats://127.0.0.1:4222",)
    #: task_store's address; gateways and workers may list several replicas, comma-separated.
    task_store_addr: Annotated[CommaList, Field(min_length=1)] = ("127.0.0.1:50052",)
    data_dir: Path = Path("./.data")
    log_level: str = "info"
    log_format: str = "json"
    #: ``uvloop`` (libuv: less CPU per socket wake-up) or ``asyncio`` (the standard loop).
    event_loop: Annotated[EventLoop, BeforeValidator(_event_loop)] = "uvloop"
    #: New container objects between two young collections of Python's garbage collector (the
    #: interpreter's default: 700); start-up's objects are frozen out of every collection
    #: (``charai.core.lifecycle.settle_gc``). 0: the interpreter's defaults, nothing frozen.
    gc_threshold: int = Field(default=10_000, ge=0)
    #: Gateways and workers send their coalesced Exchange calls as messages of long-lived
    #: ExchangeStream calls (``charai.core.exchange_stream``, the default); off: unary Exchange calls.
    exchange_stream: bool = True
    #: Stream and bucket replicas (3 on a NATS cluster).
    nats_replicas: int = Field(default=1, ge=1, le=5)
    #: Prefix of every NATS subject, stream and bucket, so two stacks can share one NATS.
    namespace: str = Field(default="charai", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    #: Shared secret that gateways and workers present to task_store (empty: internal auth off).
    internal_token: SecretStr = SecretStr("")
    #: Secret that signs media URLs (gateway) — also known to nobody else.
    media_signing_key: SecretStr = SecretStr("")
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    #: The API dialect of the image provider: ``zhipu`` (GLM-Image / CogView) or ``openai``
    #: (``images/generations`` of OpenAI or a compatible server).
    image_provider: Annotated[Provider, BeforeValidator(_provider)] = "zhipu"
    #: The API dialect of the TTS provider: ``zhipu`` (GLM-TTS) or ``openai`` (``audio/speech``).
    tts_provider: Annotated[Provider, BeforeValidator(_provider)] = "zhipu"
    #: The image model (default per provider: :data:`DEFAULT_IMAGE_MODELS`); gateways and task_store
    #: check sizes and prompt length against its documented limits.
    image_model: str = ""
    #: The TTS model (default per provider); gateways and task_store check text length, voices
    #: and formats against it.
    tts_model: str = ""
    #: HOST:PORT of this process's Prometheus ``/metrics`` (task_store, workers; empty: off).
    #: The gateway serves ``/metrics`` on its HTTP port instead.
    metrics_addr: str = ""

    @model_validator(mode="before")
    @classmethod
    def _default_models(cls, data: Any) -> Any:
        data = provider_default(data, "image_provider", "image_model", DEFAULT_IMAGE_MODELS)
        return provider_default(data, "tts_provider", "tts_model", DEFAULT_TTS_MODELS)

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("must be a directory (this is a file)")
        return value

    @field_validator("task_store_addr")
    @classmethod
    def _each_task_store_addr(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for part in value:
            _check_addr(part)
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, value: str) -> str:
        return _check_addr(value) if value else value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value.lower() not in {"json", "console"}:
            raise ValueError("must be json or console")
        return value.lower()

    @field_validator("internal_token")
    @classmethod
    def _internal_token(cls, value: SecretStr) -> SecretStr:
        # Surrounding whitespace (a secret file's newline) is dropped: kept, every internal call
        # failed (a newline is not a legal header value; a space made task_store refuse it).
        token = value.get_secret_value().strip()
        if any(not ("!" <= c <= "~") for c in token):
            raise ValueError("must be printable ASCII without spaces (it travels in a header)")
        return SecretStr(token)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return value.lower()

    def secret_values(self) -> list[str]:
        """Every secret this process holds (non-empty), for the log scrubber
        (:func:`charai.core.logs.configure`): each ``SecretStr`` setting, plus what a service's
        settings derive from them (:meth:`derived_secrets`)."""
        values = [
            value.get_secret_value()
            for name in type(self).model_fields
            if isinstance(value := getattr(self, name), SecretStr)
        ]
        values += self.derived_secrets()
        return [v for v in values if v]

    def derived_secrets(self) -> Iterator[str]:
        """Secrets that are not a ``SecretStr`` field of their own (client tokens read from a
        file, a password inside a URL). None here."""
        return iter(())


def parse_api_keys(inline: str, file_text: str = "") -> list[tuple[str, str]]:
    """``CHARAI_API_KEYS`` (``token=tenant`` pairs, comma-separated) and the text of
    ``CHARAI_API_KEYS_FILE`` (one pair per line, ``#`` comments) as ``(token, tenant)`` pairs, in
    order. An entry without ``=`` or without a tenant comes back with tenant ``""`` (its text as
    the token): the gateway refuses it, the log scrubber still hides it.

    The one parser of that format: gateway settings and :mod:`charai.core.logs` both use it.
    """
    pairs: list[tuple[str, str]] = []
    for raw in [*inline.split(","), *file_text.splitlines()]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, _, tenant = line.partition("=")
        pairs.append((token.strip(), tenant.strip()))
    return pairs


S = TypeVar("S", bound=BaseSettings)
#: Settings whose values an error never shows: secrets, and URLs (a database URL may hold a
#: password). ``URL`` only as the name's end: ``CHARAI_MEDIA_URL_TTL`` is a duration.
_SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|URLS?$", re.IGNORECASE)


class SettingRefusedError(SystemExit):
    """A setting refused after loading: the process exits with code 2, as :func:`load` makes it
    for a bad value; ``str()`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(message: str) -> NoReturn:
    """Stops the process as a bad setting does: ``message`` (naming the variable) on stderr,
    exit code 2. For checks made after loading (a file a setting names, a URL's scheme)."""
    sys.stderr.write(f"charai: bad setting, cannot start:\n  {message}\n")
    raise SettingRefusedError(message)


def load(cls: type[S], **overrides: Any) -> S:
    """Builds the settings, or exits with a message naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"charai: bad setting(s), cannot start:\n{describe_errors(cls, exc)}\n")
        raise SystemExit(2) from None


def describe_errors(cls: type[BaseSettings], exc: ValidationError) -> str:
    """One line per error: the variable, its value unless it may be a secret, and what is wrong.
    A check across several settings (a model validator) names its variables in its message."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors():
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:
            lines.append(f"  {message}")
            continue
        name = prefix + str(err["loc"][0]).upper()
        raw = os.environ.get(name)
        # Never echo what may be a secret (keys, tokens, URLs with passwords).
        shown = "<unset>" if raw is None else ("<hidden>" if _SECRETISH.search(name) else repr(raw))
        lines.append(f"  {name}={shown}: {message}")
    return "\n".join(lines)
