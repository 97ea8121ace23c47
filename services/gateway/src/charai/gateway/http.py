"""The gateway's HTTP/1.1 port: media downloads (signed capability URLs, range requests), health,
the task console's static files, and the CORS policy every browser-facing route shares.

gRPC-web (:mod:`charai.gateway.grpcweb`) and the REST routes (:mod:`charai.gateway.rest`) live on
this port too; they are bridged to the gateway's own gRPC port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import mimetypes
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

from aiohttp import hdrs, web
from charai.core.media import MediaStore, MediaUnavailableError, UrlSigner, content_type_of, valid_key

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def media_routes(media: MediaStore, signer: UrlSigner) -> list[web.RouteDef]:
    async def get_media(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        exp = request.query.get("exp", "")
        sig = request.query.get("sig", "")
        if not valid_key(key) or not signer.verify(key, exp, sig):
            # One answer for unknown, tampered and expired links: nothing to learn from it.
            return web.json_response(
                {"error": {"code": "FORBIDDEN", "message": "invalid or expired media link"}}, status=403
            )
        try:
            data = await media.get(key)
        except MediaUnavailableError:
            return web.json_response(
                {"error": {"code": "UNAVAILABLE", "message": "media temporarily unavailable; retry"}},
                status=503,
                headers={"Retry-After": "1"},
            )
        if data is None:
            return web.json_response(
                {"error": {"code": "NOT_FOUND", "message": "media not found"}}, status=404
            )
        headers = {
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, max-age=3600",
            "Content-Type": content_type_of(key),
            "X-Content-Type-Options": "nosniff",
        }
        range_header = request.headers.get("Range")
        if range_header:
            span = _parse_range(range_header, len(data))
            if span is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return web.Response(status=416, headers=headers)
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            # A HEAD gets the body's Content-Length and no body: aiohttp leaves it out.
            return web.Response(status=206, body=data[start : end + 1], headers=headers)
        return web.Response(body=data, headers=headers)

    return [web.get("/media/{key}", get_media)]


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(value.strip())
    if not match or size == 0:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            return None
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def health_routes(
    ready: Callable[[], bool],
    stats: Callable[[], Mapping[str, int]] | None = None,
    degraded: Callable[[], Sequence[str]] | None = None,
) -> list[web.RouteDef]:
    """``GET /healthz``: serving or not, plus live counters (``open_watch_streams``) so operators
    and tests can see that closed browser tabs really released their watchers. While something
    works only in part (a provider credential's breaker is open), ``"status": "degraded"`` with
    the reasons in ``degraded``, still HTTP 200: degraded is not down."""

    async def healthz(request: web.Request) -> web.Response:
        ok = ready()
        reasons = list(degraded()) if degraded is not None and ok else []
        body: dict[str, object] = {"status": ("degraded" if reasons else "serving") if ok else "not_serving"}
        if reasons:
            body["degraded"] = reasons
        if stats is not None:
            body.update(stats())
        return web.json_response(body, status=200 if ok else 503)

    return [web.get("/healthz", healthz)]


# -- CORS -------------------------------------------------------------------------------------

#: Request headers a preflight allows when the browser does not list any.
DEFAULT_ALLOW_HEADERS = (
    "Content-Type, X-Grpc-Web, X-User-Agent, Grpc-Timeout, Authorization, Last-Event-ID, Idempotency-Key"
)
#: Response headers a cross-origin script may read (gRPC-web status and REST paging).
EXPOSE_HEADERS = (
    "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, X-Next-Page-Token, Link, Location, "
    "Content-Range, Accept-Ranges, Retry-After, WWW-Authenticate"
)
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~\-]+)*$")
_GRPC_WEB_PATH = re.compile(r"^/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$")


class CorsPolicy:
    """Which browser origins may call this port from another origin (``CHARAI_CORS_ORIGINS``).

    Why here, once: gRPC-web, REST and media share one port, so one policy decides for all of
    them. Listed origins are echoed with ``Access-Control-Allow-Credentials``; ``*`` lets any
    origin in, echoed too (browsers ignore a literal ``*`` on credentialed requests) but never
    with credentials. A request whose ``Origin`` is foreign and not allowed is refused outright,
    so a page the user happens to visit cannot submit or cancel tasks on a loopback gateway.
    """

    def __init__(self, origins: list[str]) -> None:
        self._any = "*" in origins
        self._listed = frozenset(o for o in origins if o != "*")

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._listed)

    def decide(self, request: web.Request) -> str:
        """``none`` (no Origin), ``same`` (same origin), ``listed``, ``any`` or ``refused``."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return "none"
        # Same host and port, whatever the scheme: behind a TLS-terminating proxy the page is
        # https while this port sees http.
        if origin.partition("://")[2] == request.host:
            return "same"
        if origin in self._listed:
            return "listed"
        if self._any and origin != "null":
            return "any"
        return "refused"

    def _grant(self, request: web.Request, headers: dict[str, str], verdict: str) -> None:
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = request.headers[hdrs.ORIGIN]
        if verdict == "listed":
            headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to ``OPTIONS`` with ``Access-Control-Request-Method``."""
        verdict = self.decide(request)
        if verdict == "refused":
            return web.Response(
                status=403, text="origin not allowed (CHARAI_CORS_ORIGINS)\n", headers={hdrs.VARY: "Origin"}
            )
        methods = (
            "POST, OPTIONS" if _GRPC_WEB_PATH.match(request.path) else "GET, HEAD, POST, DELETE, OPTIONS"
        )
        wanted = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").strip()
        headers: dict[str, str] = {
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: methods,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: wanted
            if _HEADER_LIST.match(wanted)
            else DEFAULT_ALLOW_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: "86400",
            hdrs.VARY: "Origin, Access-Control-Request-Headers",
        }
        if verdict in {"listed", "any"}:
            self._grant(request, headers, verdict)
        return web.Response(status=204, headers=headers)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Answers preflights and refuses foreign origins before any route runs."""
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            return self.preflight(request)
        if self.decide(request) == "refused":
            return web.json_response(
                {
                    "error": {
                        "code": "PERMISSION_DENIED",
                        "message": "this origin may not call the gateway (CHARAI_CORS_ORIGINS)",
                    }
                },
                status=403,
                headers={hdrs.VARY: "Origin"},
            )
        return await handler(request)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Adds the CORS headers to every response, streams included (before their headers go out)."""
        verdict = self.decide(request)
        if self.enabled and hdrs.VARY not in response.headers:
            response.headers[hdrs.VARY] = "Origin"
        if verdict in {"listed", "any"} and hdrs.ACCESS_CONTROL_ALLOW_ORIGIN not in response.headers:
            headers: dict[str, str] = {hdrs.ACCESS_CONTROL_EXPOSE_HEADERS: EXPOSE_HEADERS}
            self._grant(request, headers, verdict)
            response.headers.update(headers)


def host_name(host: str) -> str:
    """The name in a ``Host`` header (``name:port``, ``[v6]:port``), lowercased, no brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class LoopbackHosts:
    """With auth off (no client tokens, so the gateway listens on loopback only), answers only a
    request whose ``Host`` is a loopback name (``localhost``, ``*.localhost``, 127.0.0.0/8,
    ``::1``) or one of ``names`` (``CHARAI_PUBLIC_BASE_URL``'s host). A page on a site whose name
    its owner points at 127.0.0.1 after it loaded (DNS rebinding) is its own origin to the
    browser, so the origin check lets it in; its ``Host`` still names that site, and is refused
    here. With client tokens on, a page has no token to send, and this is not installed."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names = frozenset(host_name(n) for n in names if n)

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if name in self._names or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.allows(request.host):
            return await handler(request)
        message = (
            "without client tokens (CHARAI_API_KEYS) this gateway answers to loopback names only"
            " (localhost, 127.0.0.1, [::1]) and CHARAI_PUBLIC_BASE_URL's host"
        )
        return web.json_response({"error": {"code": "PERMISSION_DENIED", "message": message}}, status=403)


def install_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Applies ``policy`` to every route of ``app``."""
    app.middlewares.append(policy.middleware)
    app.on_response_prepare.append(policy.on_response_prepare)


# -- the task console -------------------------------------------------------------------------

#: Types the console's build emits; explicit because ``mimetypes`` depends on the host's files.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
NOT_BUILT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>charai console</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 3em auto">
<h1>The charai console is not built</h1>
<p>Run <code>make console</code> in the repository, then reload this page.
The gateway serves it from <code>CHARAI_CONSOLE_DIR</code>.</p>
<p>The API is up: gRPC-web and the REST routes (<code>/api/tasks</code>) answer on this port.</p>
</body></html>
"""


def locate_console_file(root: Path, rel: str) -> Path | None:
    """The file ``rel`` names under ``root``, or None: no dot files, nothing outside ``root``
    (``..``, symlinks out), a directory means its ``index.html``."""
    base = root.resolve()
    parts = [p for p in rel.split("/") if p]
    if any(p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    target = base.joinpath(*parts).resolve() if parts else base
    if target != base and base not in target.parents:
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


def console_routes(root: Path) -> list[web.RouteDef]:
    """``GET /`` and the console's assets, read from ``root`` on every request (so ``make console``
    can rebuild while the gateway runs). No directory listings, no dot files, nothing outside
    ``root``; a missing build answers a page that says how to build it."""

    async def serve(request: web.Request) -> web.StreamResponse:
        rel = request.match_info.get("path", "")
        target = await asyncio.to_thread(locate_console_file, root, rel)
        if target is None:
            if not rel.strip("/"):
                return web.Response(
                    text=NOT_BUILT_PAGE, content_type="text/html", headers={"Cache-Control": "no-cache"}
                )
            raise web.HTTPNotFound()
        content_type = _CONTENT_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
        return web.FileResponse(
            target,
            headers={
                hdrs.CONTENT_TYPE: content_type or "application/octet-stream",
                # Revalidate every time (ETag/Last-Modified make that cheap): a rebuilt console
                # shows at once.
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return [web.get("/", serve), web.get("/{path:.+}", serve)]
