"""HTTP to an AI provider: timeouts, size caps, classification of every failure, and one gate
per provider: an adaptive limit on the calls in flight, so a 429 makes this worker send fewer
calls at once to that provider instead of stopping them all (:class:`ProviderGate`), and a 429
with a short Retry-After is retried inside the attempt rather than through the store.

Media the provider points to (a temporary link to a generated image or audio file) is fetched
with an SSRF guard: the host is resolved once, every address must be public (or, with
``CHARAI_PROVIDER_ALLOW_PRIVATE_URLS``, loopback/private; link-local and cloud metadata
addresses never), and the connection goes to exactly the vetted addresses — aiohttp does not
resolve the name again, so a DNS answer that changes between check and connect (rebinding)
cannot redirect the fetch. No redirects are followed, no credentials are sent, and size and
time are capped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import structlog
from charai.core import tracing
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
    timeout: float = 120.0
    max_body_bytes: int = 32 * 1024 * 1024
    allow_private_urls: bool = False
    rate_limit_retries: int = 3
    rate_limit_max_wait: float = 5.0


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
    """An adaptive limit on this process's calls in flight to one provider (AIMD).

    A provider's 429 is almost always its concurrency limit speaking (Zhipu limits concurrent
    requests per account), so the answer is to send fewer calls at once, not to stop sending:
    the limit follows what the provider admits, and only the calls beyond it wait, in order of
    arrival. The call that was refused waits out its own Retry-After (:meth:`ProviderHttp.request`);
    the others carry on.

    * Decrease: a 429 sets the limit to the calls in flight at that moment minus one (the refused
      call itself), floor 1, never raising it. A burst of N refusals out of M calls in flight
      lowers it once per refused call, but each refused call has left the count before the next
      one is seen, so the burst ends at M - N, the calls the provider accepted: the limit never
      compounds below that, as a multiplicative cut per 429 would.
    * Increase: after ``limit`` successful calls in a row without a 429 (about one round trip of
      calls at the limit), the limit grows by one, up to ``ceiling``; probing upward is how it
      finds out the provider admits more again. Only successes while the limit binds count (the
      limit's worth of calls in flight, or calls waiting): in a lull the limit proves nothing,
      and drifting up then would cost the next burst its 429s all over again.

    Until the first 429 there is no limit (or ``ceiling``): the worker's own concurrency bounds
    the calls, and one round of refusals teaches the gate the provider's limit.
    """

    def __init__(self, ceiling: int | None = None) -> None:
        if ceiling is not None and ceiling < 1:
            raise ValueError("ceiling must be >= 1 or None")
        self._ceiling = ceiling
        self._limit = ceiling
        self._in_flight = 0
        self._successes = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int | None:
        """Calls allowed in flight at once; ``None`` while unlimited (no 429 seen, no ceiling)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Calls queued for a slot."""
        return len(self._waiters)

    def _has_room(self) -> bool:
        return self._limit is None or self._in_flight < self._limit

    async def acquire(self) -> None:
        """Waits for a slot (first come, first served) and takes it; pair with :meth:`release`."""
        if not self._waiters and self._has_room():
            self._in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):  # already dropped by _hand_over
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_flight -= 1
        self._hand_over()

    def rejected(self) -> None:
        """A call holding a slot was refused with a rate limit: fewer calls at once from now on."""
        self._shrink(self._in_flight - 1)

    def succeeded(self) -> None:
        """A call holding a slot was answered: after ``limit`` of these in a row, one more slot."""
        if self._limit is None or self._limit == self._ceiling:
            return
        if self._in_flight < self._limit and not self._waiters:
            return
        self._successes += 1
        if self._successes >= self._limit:
            self._limit += 1
            self._successes = 0
            self._hand_over()

    def rejected_after_release(self) -> None:
        """A rate limit reported outside :meth:`ProviderHttp.request` (a 429-class code inside a
        200 answer, seen after the call left its slot): lowered like a 429, to the calls still in
        flight. The refused task's own retry (with its Retry-After) is the store's to schedule."""
        self._shrink(self._in_flight)

    def _shrink(self, target: int) -> None:
        target = max(1, target)
        if self._limit is None or target < self._limit:
            self._limit = target
        self._successes = 0

    def _hand_over(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)


#: Resolves a host name to its addresses (``host, port -> ["203.0.113.7", ...]``).
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), TCP addresses only, in its order, without repeats."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ProviderHttp:
    """Calls one provider over one aiohttp session.

    ``resolve`` looks up media hosts (the system resolver by default; tests pass their own to
    play a rebinding DNS server).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ProviderConfig,
        gate: ProviderGate | None = None,
        resolve: Resolve | None = None,
    ):
        self._session = session
        self.config = config
        self.gate = gate or ProviderGate()
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
            await self._take_slot(limit)
            try:
                response = await self._timed_fetch(
                    "request", method, url, self._headers(headers), json_body, timeout
                )
                failure = self._classify(response) if response.status >= 300 else None
                if failure is None:
                    self.gate.succeeded()
                elif failure.kind is errors.ErrorKind.RATE_LIMITED:
                    self.gate.rejected()
            finally:
                self.gate.release()
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

    async def _take_slot(self, seconds: float) -> None:
        """:meth:`ProviderGate.acquire`, bounded like the call itself: a slot that does not free
        up within the call timeout means the calls ahead are stuck, and this attempt fails as a
        timeout (retried by the store) rather than parking its job indefinitely."""
        try:
            async with asyncio.timeout(seconds):
                await self.gate.acquire()
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
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(addresses), use_dns_cache=False, force_close=True, limit=4
        )
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
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


#: Cloud metadata endpoints: refused even when private addresses are allowed.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


def address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private: bool) -> bool:
    """Whether media may be fetched from ``address``.

    Public (globally routable) addresses are; with ``allow_private`` loopback and private ones
    (RFC 1918, ULA) too. Never: link-local (169.254/16, fe80::/10), cloud metadata, unspecified,
    multicast or reserved addresses, nor an IPv6 address that embeds a refused IPv4 one
    (IPv4-mapped, 6to4, Teredo).
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_allowed(address.ipv4_mapped, allow_private=allow_private)
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not address_allowed(embedded, allow_private=allow_private):
            return False
    if (
        address in _METADATA
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or (address.is_reserved and not address.is_loopback)  # IPv6 ::1 lies in reserved ::/8
    ):
        return False
    if address.is_global:
        return True
    return allow_private and (address.is_private or address.is_loopback)


async def check_url(url: str, *, allow_private: bool, resolve: Resolve = system_resolve) -> list[str]:
    """Vets a media URL and returns the addresses the fetch may connect to.

    Refuses (PROVIDER_BAD_RESPONSE, before any connection) a scheme other than http(s), user
    info in the URL, a host that does not resolve, or one whose addresses include any that
    :func:`address_allowed` refuses.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError(errors.bad_response(f"refusing a media URL with scheme {parts.scheme!r}"))
    if parts.username is not None or parts.password is not None:
        raise ProviderError(errors.bad_response("refusing a media URL with credentials in it"))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ProviderError(errors.bad_response("refusing a media URL with a bad port")) from None
    host = parts.hostname
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolve(host, port)
        except OSError:
            raise ProviderError(errors.unreachable("the media host does not resolve")) from None
    if not addresses:
        raise ProviderError(errors.unreachable("the media host does not resolve"))
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address_allowed(address, allow_private=allow_private):
            raise ProviderError(
                errors.bad_response(
                    f"refusing a media URL on a private, loopback, link-local or metadata address ({host})"
                )
            )
    return addresses


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers every lookup with the vetted addresses: the connection cannot go anywhere else."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        return [
            aiohttp.abc.ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self._addresses
        ]

    async def close(self) -> None:
        return None
