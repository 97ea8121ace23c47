"""The API dialects the emulator can speak, where each lives, and how each writes an error.

Why dialects: charai's workers speak either Zhipu's v4 API or the OpenAI ``/v1`` API
(``CHARAI_*_PROVIDER``); the emulator must answer both so every handler, error-classification
and end-to-end test runs against each. ``--dialect`` picks which are served; the routes of a
dialect that is not enabled answer 404.
"""

from __future__ import annotations

from aiohttp import web
from charai.emulator.wire import openai_error, zhipu_error

ZHIPU = "zhipu"
OPENAI = "openai"

PREFIXES: dict[str, str] = {ZHIPU: "/api/paas/v4", OPENAI: "/v1"}
"""Where each dialect's API lives (the base URL a worker is given is the root URL + this)."""

DIALECTS: tuple[str, ...] = tuple(PREFIXES)


def parse_dialects(text: str) -> frozenset[str]:
    """``zhipu,openai`` -> the set of dialects; raises ``ValueError`` naming an unknown one."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--dialect needs at least one of {', '.join(DIALECTS)}")
    unknown = [name for name in names if name not in PREFIXES]
    if unknown:
        raise ValueError(f"unknown dialect {unknown[0]!r}: choose from {', '.join(DIALECTS)}")
    return frozenset(names)


def dialect_of_path(path: str) -> str | None:
    """The dialect whose API prefix ``path`` is under, or ``None`` (control routes, files)."""
    for dialect, prefix in PREFIXES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return dialect
    return None


def bad_request(dialect: str, message: str, param: str | None = None) -> web.Response:
    """A 400 "invalid parameter" in the dialect's envelope (Zhipu 1214, OpenAI invalid_request_error)."""
    if dialect == OPENAI:
        return openai_error(400, message, param=param)
    return zhipu_error(400, "1214", message)


def http_error(dialect: str, request: web.Request, status: int, reason: str) -> web.Response:
    """aiohttp's own 404/405/413 on an API path, rewritten in the dialect's envelope."""
    if dialect == OPENAI:
        message = f"Invalid URL ({request.method} {request.path})" if status in (404, 405) else reason
        return openai_error(status, message)
    return zhipu_error(status, str(status), reason)


def server_error(dialect: str) -> web.Response:
    """A 500 for a handler that crashed, in the dialect's envelope."""
    if dialect == OPENAI:
        return openai_error(
            500, "The server had an error while processing your request.", type_="server_error"
        )
    return zhipu_error(500, "500", "Internal Error")
