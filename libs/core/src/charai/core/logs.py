"""structlog JSON on stdout, with context variables bound per request or job."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog
from charai.core.settings import parse_api_keys

_SECRET_KEYS = re.compile(r"(authorization|api[_-]?key|token|secret|password)", re.IGNORECASE)
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")
#: Settings whose values are secrets (``CHARAI_API_KEYS`` is ``token=tenant,...``: its tokens).
_SECRET_SETTINGS = re.compile(r"^CHARAI_\w*(API_KEY|TOKEN|SECRET|PASSWORD|SIGNING_KEY)\w*$")
#: Shorter values are not scrubbed: they would match ordinary words (and are no real secret).
_MIN_SECRET_CHARS = 8
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str]) -> None:
    """Adds values that must never appear in a log line, whatever field or message carries them.

    Why values and not only field names: a key can reach a log inside an exception message, a
    URL or a provider's error body, where no field name gives it away.
    """
    global _secret_pattern  # noqa: PLW0603 - one process-wide set, like the logging config
    _secrets.update(v for v in (v.strip() for v in values) if len(v) >= _MIN_SECRET_CHARS)
    if _secrets:
        ordered = sorted(_secrets, key=len, reverse=True)  # a longer secret wins over its prefix
        _secret_pattern = re.compile("|".join(re.escape(v) for v in ordered))


def secrets_from_env(environ: Mapping[str, str]) -> list[str]:
    """The secret values among ``CHARAI_*`` variables, found by their names: provider keys,
    tokens, signing keys, the files of passwords, and the tokens of ``CHARAI_API_KEYS`` /
    ``CHARAI_API_KEYS_FILE``. A net under :func:`configure`'s ``secrets`` (the loaded settings'
    own values): it also covers variables no settings class of this process reads."""
    found: list[str] = []
    for name, value in environ.items():
        if not _SECRET_SETTINGS.match(name):
            continue
        if name == "CHARAI_API_KEYS_FILE":
            found += [token for token, _ in parse_api_keys("", _read_small(value))]
        elif name == "CHARAI_API_KEYS":
            found += [token for token, _ in parse_api_keys(value)]
        elif name.endswith("_FILE"):
            found.append(_read_small(value))
        else:
            found.append(value)
    return found


def _read_small(path: str) -> str:
    """A secret file's text ('' when unreadable: the service that needs it says so itself)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(65536)
    except (OSError, UnicodeDecodeError):
        return ""


def scrub(text: str) -> str:
    """``text`` with every registered secret and bearer token replaced."""
    if _secret_pattern is not None:
        text = _secret_pattern.sub("[redacted]", text)
    if "earer" in text:
        text = _BEARER.sub("Bearer [redacted]", text)
    return text


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no field named like a secret, no bearer token, no registered secret
    value ever reaches a log."""
    for key in list(event_dict):
        value = event_dict[key]
        if _SECRET_KEYS.search(key) and key not in {"token_count"}:
            event_dict[key] = "[redacted]"
        elif isinstance(value, str):
            event_dict[key] = scrub(value)
        elif value is not None and not isinstance(value, (int, float, bool)):
            text = str(value)
            cleaned = scrub(text)
            if cleaned != text:
                event_dict[key] = cleaned
    return event_dict


class _ScrubFilter(logging.Filter):
    """The same redaction for stdlib logging (library warnings, tracebacks on stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


class LineWriter:
    """structlog's ``PrintLogger`` with each line written in one ``write``: ``print`` writes the
    text and its newline separately, so processes that share one stdout (the gateway's processes,
    unbuffered under ``make run``) could interleave two lines into one broken JSON line. Writes
    to the current ``sys.stdout``, as ``PrintLogger`` does, so test capture sees the lines."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_announcer: Any = None


def configure(service: str, level: str = "info", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    """Configures structlog and the stdlib root logger once per process.

    ``secrets``: the values of the process's secret settings (``settings.secret_values()``),
    scrubbed from every line; variables named like secrets are scrubbed too (:func:`secrets_from_env`).
    """
    global _announcer  # noqa: PLW0603 - one process-wide logger, built here once
    register_secrets([*secrets, *secrets_from_env(os.environ)])
    numeric = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]
    writer = LineWriter()
    _announcer = structlog.wrap_logger(writer, processors=processors, wrapper_class=structlog.BoundLogger)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
            handler.addFilter(_ScrubFilter())
    # aiohttp's access log and nats' reconnect chatter are noise at INFO; our own lines say more.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def announce(event: str, **fields: Any) -> None:
    """Logs a lifecycle line (listening, started, stopped) whatever the log level: supervisors
    such as ``make run`` and the tests wait for these lines."""
    if _announcer is None:
        structlog.get_logger().info(event, **fields)
    else:
        _announcer.info(event, **fields)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
