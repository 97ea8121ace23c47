"""The SSRF guard on media the provider points to (a temporary link to a generated image or
audio file).

The host is resolved once, every address must be public (or, with
``CHARAI_PROVIDER_ALLOW_PRIVATE_URLS``, loopback/private; link-local and cloud metadata
addresses never), and the connection goes to exactly the vetted addresses
(:func:`pinned_connector`) — aiohttp does not resolve the name again, so a DNS answer that
changes between check and connect (rebinding) cannot redirect the fetch.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
from charai.core.clock import Clock, SystemClock
from charai.core.domain import errors
from charai.worker.provider import ProviderError

#: Resolves a host name to its addresses (``host, port -> ["203.0.113.7", ...]``).
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), TCP addresses only, in its order, without repeats."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class CachedResolve:
    """A :data:`Resolve` that keeps each answer for ``ttl`` seconds (aiohttp's own DNS cache keeps
    one 10 s), so that a stream of requests to one host does not pay a lookup (a thread of the
    loop's executor and a DNS query) for each. Only the lookup is kept: :func:`vet_url` checks
    the addresses on every request, cached or not. A failed lookup is not kept; at most
    ``max_hosts`` answers are (the oldest goes first)."""

    def __init__(
        self,
        resolve: Resolve = system_resolve,
        *,
        ttl: float = 10.0,
        max_hosts: int = 1024,
        clock: Clock | None = None,
    ) -> None:
        self._resolve = resolve
        self._ttl = ttl
        self._max = max_hosts
        self._clock = clock or SystemClock()
        self._answers: collections.OrderedDict[tuple[str, int], tuple[float, list[str]]] = (
            collections.OrderedDict()
        )

    async def __call__(self, host: str, port: int) -> list[str]:
        key = (host.lower(), port)
        kept = self._answers.get(key)
        if kept is not None and kept[0] > self._clock.monotonic():
            return list(kept[1])
        addresses = await self._resolve(host, port)
        self._answers.pop(key, None)
        self._answers[key] = (self._clock.monotonic() + self._ttl, list(addresses))
        while len(self._answers) > self._max:
            self._answers.popitem(last=False)
        return addresses


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


class EgressRefusedError(Exception):
    """A URL egress may not reach: ``reason`` says why; ``unresolved`` when its host did not
    resolve (worth trying again later), otherwise the URL itself is refused."""

    def __init__(self, reason: str, *, unresolved: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unresolved = unresolved


async def vet_url(url: str, *, allow_private: bool, resolve: Resolve = system_resolve) -> list[str]:
    """The addresses a request to ``url`` may connect to, or :class:`EgressRefusedError`: a scheme other
    than http(s), user info in the URL, a bad port, a host that does not resolve, or one whose
    addresses include any that :func:`address_allowed` refuses. The one guard of every egress
    (provider media, webhooks)."""
    try:
        parts = urlsplit(url)
        _ = parts.hostname  # a bad IPv6 literal raises ValueError here or above
    except ValueError:
        raise EgressRefusedError("that cannot be read (a bad IPv6 address)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EgressRefusedError(f"with scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise EgressRefusedError("with credentials in it")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise EgressRefusedError("with a bad port") from None
    host = parts.hostname
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolve(host, port)
        except OSError:
            raise EgressRefusedError("the host does not resolve", unresolved=True) from None
    if not addresses:
        raise EgressRefusedError("the host does not resolve", unresolved=True)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address_allowed(address, allow_private=allow_private):
            raise EgressRefusedError(f"on a private, loopback, link-local or metadata address ({host})")
    return addresses


async def check_url(url: str, *, allow_private: bool, resolve: Resolve = system_resolve) -> list[str]:
    """Vets a media URL the provider gave (:func:`vet_url`): a refusal is PROVIDER_BAD_RESPONSE,
    a host that does not resolve is an unreachable provider (retried), before any connection."""
    try:
        return await vet_url(url, allow_private=allow_private, resolve=resolve)
    except EgressRefusedError as refused:
        if refused.unresolved:
            raise ProviderError(errors.unreachable("the media host does not resolve")) from None
        raise ProviderError(errors.bad_response(f"refusing a media URL {refused.reason}")) from None


def pinned_connector(addresses: list[str], *, keep_alive: float = 0.0) -> aiohttp.TCPConnector:
    """A connector that connects to ``addresses`` (vetted by :func:`check_url`) and nowhere else,
    with no DNS cache. By default no connection is kept alive and at most 4 are open; with
    ``keep_alive`` (seconds), an idle connection is kept that long for the next request, and the
    caller bounds how many are open."""
    resolver = _PinnedResolver(addresses)
    if keep_alive <= 0:
        return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True, limit=4)
    return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, keepalive_timeout=keep_alive, limit=0)


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
