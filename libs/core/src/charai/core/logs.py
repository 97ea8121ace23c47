"""structlog JSON on stdout, with context variables bound per request or job."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(authorization|api[_-]?key|token|secret|password)", re.IGNORECASE)
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no field named like a secret, no bearer token, ever reaches a log."""
    for key in list(event_dict):
        value = event_dict[key]
        if _SECRET_KEYS.search(key) and key not in {"token_count"}:
            event_dict[key] = "[redacted]"
        elif isinstance(value, str) and "earer" in value:
            event_dict[key] = _BEARER.sub("Bearer [redacted]", value)
    return event_dict


_announcer: Any = None


def configure(service: str, level: str = "info", fmt: str = "json") -> None:
    """Configures structlog and the stdlib root logger once per process."""
    global _announcer  # noqa: PLW0603 - one process-wide logger, built here once
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
    _announcer = structlog.wrap_logger(
        structlog.PrintLogger(sys.stdout), processors=processors, wrapper_class=structlog.BoundLogger
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
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
