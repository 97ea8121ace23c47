"""TaskService calls made on an HTTP client's behalf."""

from __future__ import annotations

from aiohttp import hdrs, web


def call_metadata(request: web.Request, *, query_token: bool = False) -> list[tuple[str, str]]:
    """The gRPC metadata of a call made on the HTTP client's behalf: its bearer token (from
    ``Authorization``; with ``query_token`` also ``?access_token=``, for EventSource, which cannot
    send headers) and its address."""
    metadata = []
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    if authorization is None and query_token and request.query.get("access_token"):
        authorization = f"Bearer {request.query['access_token']}"
    if authorization is not None and all(0x20 <= ord(c) <= 0x7E for c in authorization):
        metadata.append(("authorization", authorization))
    if request.remote:
        metadata.append(("x-forwarded-for", request.remote))
    return metadata
