"""HTTP to an AI provider: timeouts, size caps, classification of every failure, and one gate
per provider so a 429 slows every call of this worker to that provider, not only one task's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from charai.core.domain import errors
from charai.core.domain.errors import ProviderFailure

log = structlog.get_logger("provider")


class ProviderError(Exception):
    """A failed provider call, already classified (retryability is a property of ``failure.kind``)."""

    def __init__(self, failure: ProviderFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderConfig:
    """How to reach one provider.

    Attributes:
        base_url: e.g. ``https://open.bigmodel.cn/api/paas/v4``.
        api_key: sent as ``Authorization: Bearer``; never logged.
        model: the model name sent in each request.
        key_setting: the setting an operator must fix when the key is refused.
        timeout: seconds for one whole call (connect + answer).
        max_body_bytes: larger answers are refused, not buffered.
        allow_private_urls: whether media URLs on loopback/private addresses may be fetched
            (the local emulator needs it; a real provider never does).
    """

    base_url: str
    api_key: str
    model: str
    key_setting: str
    timeout: float = 120.0
    max_body_bytes: int = 32 * 1024 * 1024
    allow_private_urls: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise ProviderError(errors.bad_response("the body is not valid JSON", self.status)) from None


class ProviderGate:
    """Shared pacing for all calls of this process to one provider.

    After a 429 the gate stays closed until the provider's Retry-After (jittered, so callers do
    not return in one burst) has passed; every call waits at the gate first.
    """

    def __init__(self) -> None:
        self._open_at = 0.0

    def pause(self, seconds: float) -> None:
        until = time.monotonic() + seconds * (1 + random.uniform(0, 0.25))
        self._open_at = max(self._open_at, until)

    @property
    def closed_for(self) -> float:
        return max(0.0, self._open_at - time.monotonic())

    async def wait(self) -> None:
        while (delay := self.closed_for) > 0:  # noqa: ASYNC110 - the deadline moves when another 429 arrives
            # Spread the waiters over a short window instead of releasing them together.
            await asyncio.sleep(delay + random.uniform(0, min(1.0, delay)))


class ProviderHttp:
    """Calls one provider over one aiohttp session."""

    def __init__(
        self, session: aiohttp.ClientSession, config: ProviderConfig, gate: ProviderGate | None = None
    ):
        self._session = session
        self.config = config
        self.gate = gate or ProviderGate()

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        headers["User-Agent"] = "charai-worker/0.1"
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """One call to ``{base_url}{path}``; non-2xx answers raise a classified ProviderError."""
        await self.gate.wait()
        url = self.config.base_url.rstrip("/") + path
        response = await self._fetch(method, url, self._headers(headers), json_body, timeout)
        if response.status >= 300:
            failure = self._classify(response)
            if failure.kind is errors.ErrorKind.RATE_LIMITED:
                self.gate.pause(failure.retry_after or 1.0)
            raise ProviderError(failure)
        return response

    async def download(self, url: str, timeout: float | None = None) -> Response:
        """Fetches media the provider pointed to, with the same caps and an SSRF guard."""
        await check_url(url, allow_private=self.config.allow_private_urls)
        response = await self._fetch("GET", url, {"User-Agent": "charai-worker/0.1"}, None, timeout)
        if response.status != 200:
            raise ProviderError(
                errors.bad_response(f"media download answered HTTP {response.status}", response.status)
            )
        return response

    async def _fetch(
        self, method: str, url: str, headers: dict[str, str], json_body: Any, timeout: float | None
    ) -> Response:
        limit = timeout or self.config.timeout
        try:
            async with asyncio.timeout(limit):
                async with self._session.request(
                    method, url, json=json_body, headers=headers, allow_redirects=False
                ) as resp:
                    body = await _read_capped(resp.content, self.config.max_body_bytes, resp.content_length)
                    return Response(
                        resp.status,
                        resp.headers.get("Content-Type", "").split(";")[0].strip().lower(),
                        body,
                        {k.lower(): v for k, v in resp.headers.items()},
                    )
        except TimeoutError:
            raise ProviderError(errors.timeout(limit)) from None
        except aiohttp.ClientPayloadError as exc:
            raise ProviderError(errors.bad_response(f"the body was cut off ({type(exc).__name__})")) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProviderError(errors.unreachable(type(exc).__name__)) from None

    def _classify(self, response: Response) -> ProviderFailure:
        code, message, error_type = "", "", ""
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError):
            body = json.loads(response.body)
            error = body.get("error", body) if isinstance(body, dict) else {}
            if isinstance(error, dict):
                code = str(error.get("code") or "")
                message = str(error.get("message") or "")[:500]
                error_type = str(error.get("type") or "")
        retry_after = errors.parse_retry_after(
            response.headers.get("retry-after"), response.headers.get("retry-after-ms")
        )
        if 300 <= response.status < 400:
            return errors.bad_response(f"unexpected redirect (HTTP {response.status})", response.status)
        return errors.classify_http(
            response.status,
            code,
            message,
            error_type=error_type,
            retry_after=retry_after,
            key_setting=self.config.key_setting,
        )


async def _read_capped(content: aiohttp.StreamReader, cap: int, declared: int | None) -> bytes:
    if declared is not None and declared > cap:
        raise ProviderError(errors.bad_response(f"the body is {declared} bytes, over the {cap}-byte cap"))
    chunks: list[bytes] = []
    size = 0
    async for chunk in _chunks(content):
        size += len(chunk)
        if size > cap:
            raise ProviderError(errors.bad_response(f"the body is over the {cap}-byte cap"))
        chunks.append(chunk)
    return b"".join(chunks)


async def _chunks(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await content.read(65536):
        yield chunk


_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "::ffff:0:0/96",
    )
]


async def check_url(url: str, *, allow_private: bool) -> None:
    """Refuses media URLs that are not http(s) or that resolve to loopback/private/link-local/
    metadata addresses (SSRF), unless private addresses are explicitly allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError(errors.bad_response(f"refusing a media URL with scheme {parts.scheme!r}"))
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        raise ProviderError(errors.unreachable("the media host does not resolve")) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if any(address in net for net in _BLOCKED):
            raise ProviderError(errors.bad_response("refusing a media URL on a private or loopback address"))
