"""HTTP to an AI provider: timeouts, size caps, classification of every failure, and one gate
per provider: an adaptive limit on the calls in flight, so a 429 makes the workers send fewer
calls at once to that provider instead of stopping them all (per process:
:class:`~charai.worker.gate.ProviderGate`; shared by every worker through NATS, with the
credential's circuit breaker: :class:`~charai.worker.shared_gate.SharedGate`), and a 429 with a
short Retry-After is retried inside the attempt rather than through the store.

Media the provider points to (a temporary link to a generated image or audio file) is fetched
with the SSRF guard of :mod:`charai.worker.egress`: vetted addresses only, the connection pinned
to them. No redirects are followed, no credentials are sent, and size and time are capped.

:class:`ProviderError` and :class:`Response` live in :mod:`charai.worker.provider`; they are
exported here too, for the callers of :class:`ProviderHttp` that import them with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import structlog
from charai.core import tracing
from charai.core.domain import errors
from charai.core.domain.errors import ProviderFailure
from charai.worker.egress import Resolve, check_url, pinned_connector, system_resolve
from charai.worker.gate import Gate, ProviderGate, Slot
from charai.worker.provider import ProviderError, Response

__all__ = ["ProviderConfig", "ProviderError", "ProviderHttp", "Response"]

log = structlog.get_logger("provider")


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderConfig:
    """How to reach one provider.

    Attributes:
        base_url: e.g. ``https://open.bigmodel.cn/api/paas/v4``.
        api_key: sent as ``Authorization: Bearer``; never logged.
        model: the model name sent in each request.
        dialect: the API the provider speaks: ``zhipu`` (GLM-Image / GLM-TTS) or ``openai``
            (OpenAI's ``images/generations`` and ``audio/speech``, or a compatible server); the
            handlers shape their requests and read answers by it.
        key_setting: the setting an operator must fix when the key is refused.
        timeout: seconds for one whole call (connect + answer).
        max_body_bytes: larger answers are refused, not buffered.
        allow_private_urls: whether media URLs on loopback/private addresses may be fetched
            (the local emulator needs it; a real provider never does).
        rate_limit_retries: how many times one :meth:`ProviderHttp.request` calls again after a
            429 before it raises RATE_LIMITED (then the store's retry policy takes over).
        rate_limit_max_wait: the longest Retry-After retried that way, in seconds. 5 s: a
            concurrency 429 (Retry-After 1 from Zhipu) clears within a call or two, and waiting
            in the attempt costs nothing but this job's slot; a longer Retry-After means a real
            rate or quota window, better waited out by the store's delayed redelivery than by a
            parked job. With 3 retries an attempt waits at most 3 x 5 x 1.25 s on Retry-After.
    """

    base_url: str
    api_key: str
    model: str
    key_setting: str
    dialect: str = "zhipu"
    timeout: float = 120.0
    max_body_bytes: int = 32 * 1024 * 1024
    allow_private_urls: bool = False
    rate_limit_retries: int = 3
    rate_limit_max_wait: float = 5.0


class ProviderHttp:
    """Calls one provider over one aiohttp session.

    ``resolve`` looks up media hosts (the system resolver by default; tests pass their own to
    play a rebinding DNS server).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ProviderConfig,
        gate: Gate | None = None,
        resolve: Resolve | None = None,
    ):
        self._session = session
        self.config = config
        #: This process's own gate, or the one shared through NATS (limiter and breaker).
        self.gate: Gate = gate or ProviderGate()
        self._resolve = resolve or system_resolve
        #: Called after each provider HTTP call with (operation, outcome, seconds), outcome the
        #: HTTP status or the failure kind: the worker's provider-call histogram.
        self.observe: Callable[[str, str, float], None] | None = None

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        headers["User-Agent"] = "charai-worker/0.1"
        if tracing.current.get():
            # The provider call is a span of the client's trace (W3C trace context).
            headers["traceparent"] = tracing.child(tracing.current.get())
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
        """One call to ``{base_url}{path}``; non-2xx answers raise a classified ProviderError.

        The call first takes a slot at the :attr:`gate` (waiting at most the call timeout for
        one). A rate limit whose Retry-After is at most ``config.rate_limit_max_wait`` is called
        again after that wait (x 1-1.25, so the refused calls do not come back together), up to
        ``config.rate_limit_retries`` times: the slot is given back while waiting, so the
        worker's other calls go on. Each call keeps its own timeout.
        """
        url = self.config.base_url.rstrip("/") + path
        limit = timeout or self.config.timeout
        retries_left = self.config.rate_limit_retries
        while True:
            slot = await self._take_slot(limit)
            try:
                try:
                    response = await self._timed_fetch(
                        "request", method, url, self._headers(headers), json_body, timeout
                    )
                except ProviderError as exc:  # timeout, unreachable, cut-off body
                    self.gate.failed(slot, exc.failure)
                    raise
                failure = self._classify(response) if response.status >= 300 else None
                if failure is None:
                    self.gate.succeeded(slot)
                elif failure.kind is errors.ErrorKind.RATE_LIMITED:
                    self.gate.rejected(slot, failure.retry_after)
                else:
                    self.gate.failed(slot, failure)
            finally:
                self.gate.release(slot)
            if failure is None:
                return response
            wait = self._rate_limit_wait(failure) if retries_left > 0 else None
            if wait is None:
                raise ProviderError(failure)
            retries_left -= 1
            log.info(
                "provider_rate_limited_retrying_in_attempt",
                retry_after=failure.retry_after,
                wait=round(wait, 3),
                retries_left=retries_left,
                limit=self.gate.limit,
            )
            await asyncio.sleep(wait)

    async def _take_slot(self, seconds: float) -> Slot | None:
        """:meth:`Gate.acquire`, bounded like the call itself: a slot that does not free up
        within the call timeout means the calls ahead are stuck, and this attempt fails as a
        timeout (retried by the store) rather than parking its job indefinitely. An open
        breaker refuses the call here, with its error and no provider call."""
        try:
            async with asyncio.timeout(seconds):
                return await self.gate.acquire()
        except TimeoutError:
            raise ProviderError(
                ProviderFailure(
                    errors.ErrorKind.PROVIDER_TIMEOUT,
                    f"no free slot to the provider within {seconds:g} s "
                    f"({self.gate.in_flight} calls in flight, limit {self.gate.limit})",
                )
            ) from None

    def _rate_limit_wait(self, failure: ProviderFailure) -> float | None:
        """Seconds to wait before calling again inside the attempt, or ``None`` to raise instead."""
        if failure.kind is not errors.ErrorKind.RATE_LIMITED or failure.retry_after is None:
            return None
        if failure.retry_after > self.config.rate_limit_max_wait:
            return None
        return failure.retry_after * random.uniform(1.0, 1.25)

    async def download(self, url: str, timeout: float | None = None) -> Response:
        """Fetches media the provider pointed to, with the same caps and an SSRF guard.

        The request goes to the addresses :func:`check_url` vetted and nowhere else: a session of
        its own whose resolver answers only those (TLS still checks the certificate against the
        URL's host name). No ``Authorization``: the provider key is for the provider's API, not for
        whatever host a response names.
        """
        addresses = await check_url(url, allow_private=self.config.allow_private_urls, resolve=self._resolve)
        async with aiohttp.ClientSession(connector=pinned_connector(addresses), trust_env=False) as session:
            response = await self._timed_fetch(
                "download", "GET", url, {"User-Agent": "charai-worker/0.1"}, None, timeout, session=session
            )
        if response.status != 200:
            raise ProviderError(
                errors.bad_response(f"media download answered HTTP {response.status}", response.status)
            )
        return response

    async def _timed_fetch(self, operation: str, *args: Any, **kwargs: Any) -> Response:
        """:meth:`_fetch`, timed for :attr:`observe` (no-op when nobody observes)."""
        if self.observe is None:
            return await self._fetch(*args, **kwargs)
        started = time.perf_counter()
        outcome = "error"
        try:
            response = await self._fetch(*args, **kwargs)
            outcome = str(response.status)
            return response
        except ProviderError as exc:
            outcome = str(exc.failure.kind.name).lower()
            raise
        finally:
            self.observe(operation, outcome, time.perf_counter() - started)

    async def _fetch(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        json_body: Any,
        timeout: float | None,
        session: aiohttp.ClientSession | None = None,
    ) -> Response:
        limit = timeout or self.config.timeout
        try:
            async with asyncio.timeout(limit):
                async with (session or self._session).request(
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
