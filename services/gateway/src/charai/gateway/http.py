"""The gateway's HTTP/1.1 port: media downloads (signed capability URLs, range requests) and health."""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import web
from charai.core.media import MediaStore, UrlSigner, content_type_of, valid_key

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
        data = await media.get(key)
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
            body = data[start : end + 1] if request.method != "HEAD" else b""
            return web.Response(status=206, body=body, headers=headers)
        return web.Response(body=data if request.method != "HEAD" else b"", headers=headers)

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


def health_routes(ready: Callable[[], bool]) -> list[web.RouteDef]:
    async def healthz(request: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"status": "serving" if ok else "not_serving"}, status=200 if ok else 503)

    return [web.get("/healthz", healthz)]
