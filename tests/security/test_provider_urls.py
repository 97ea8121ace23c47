"""Media URLs a provider hands back are fetched safely (SSRF): only http(s), no credentials in the
URL, never a loopback/private/link-local/metadata address unless private addresses are allowed
(the emulator's case) and metadata never, the connection pinned to the address that was vetted
(DNS rebinding), no redirects, no provider key sent, size and time capped.

A real HTTP server on 127.0.0.1 stands in for "an internal service": it counts every request, so
"refused" means it was never reached. Addresses that must never be connected to (169.254.169.254,
10.0.0.1, ...) are refused before any connection: the answer is the guard's own refusal, at once.
A rebinding DNS server is played by the resolver seam of ProviderHttp (no external DNS).

"Before any connection" is observed, not timed: the interpreter's ``socket.connect`` audit event
fires for every outgoing connection this process attempts (aiohttp's included), and a refusal
must happen with none recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from charai.core.domain.errors import ErrorKind
from charai.worker.egress import Resolve
from charai.worker.http import ProviderConfig, ProviderHttp
from charai.worker.provider import ProviderError

CANARY_KEY = "sk-canary-provider-key-for-ssrf"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


#: Where :func:`_audit` records connection attempts while :func:`no_connection` is active.
_connects: list[Any] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside no_connection()


@contextlib.contextmanager
def no_connection(what: str) -> Iterator[None]:
    """Fails if any socket of this process tries to connect inside the block."""
    global _connects
    attempts: list[Any] = []
    _connects = attempts
    try:
        yield
    finally:
        _connects = None
    assert attempts == [], f"{what}: connections attempted {attempts}"


@dataclasses.dataclass
class Internal:
    """A server on 127.0.0.1 that must not be reachable through a provider URL by default."""

    port: int
    hits: list[tuple[str, dict[str, str]]]

    def url(self, path: str = "/media.png", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def internal() -> AsyncIterator[Internal]:
    hits: list[tuple[str, dict[str, str]]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        hits.append((request.path, dict(request.headers)))
        if request.path == "/redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/canary")
        if request.path == "/huge":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"x" * 1024)
            return response
        if request.path == "/declared-huge":
            return web.Response(body=b"x" * 4096)
        if request.path == "/hang":
            await asyncio.Event().wait()  # never answers (cancelled when the server stops)
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Internal(int(runner.addresses[0][1]), hits)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def provider(
    session: aiohttp.ClientSession, *, allow_private: bool, resolve: Resolve | None = None, **config: float
) -> ProviderHttp:
    return ProviderHttp(
        session,
        ProviderConfig(
            base_url="http://127.0.0.1:9/api/paas/v4",
            api_key=CANARY_KEY,
            model="glm-image",
            key_setting="CHARAI_IMAGE_API_KEY",
            allow_private_urls=allow_private,
            timeout=config.get("timeout", 30.0),
            max_body_bytes=int(config.get("max_body_bytes", 1024 * 1024)),
        ),
        resolve=resolve,
    )


async def refused(http: ProviderHttp, url: str) -> str:
    """Downloads ``url``, expects the SSRF guard's refusal before any connection, returns its
    message."""
    with no_connection(url), pytest.raises(ProviderError) as caught:
        await http.download(url)
    failure = caught.value.failure
    assert failure.kind is ErrorKind.PROVIDER_BAD_RESPONSE, (url, failure)
    assert "refusing" in failure.message, (url, failure.message)
    return failure.message


NEVER = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
    "http://169.254.170.2/v2/credentials",  # ECS task credentials
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS metadata over IPv6
    "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud metadata
    "http://[fe80::1]/",  # link-local
    "http://0.0.0.0:{port}/media.png",  # "this host"
    "http://[::]:{port}/media.png",
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
]
PRIVATE = [
    "http://127.0.0.1:{port}/media.png",
    "http://localhost:{port}/media.png",
    "http://[::1]:{port}/media.png",
    "http://127.1:{port}/media.png",  # short form
    "http://2130706433:{port}/media.png",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:{port}/media.png",  # ... and as hex
    "http://[::ffff:127.0.0.1]:{port}/media.png",  # IPv4-mapped IPv6
    "http://10.0.0.1/media.png",
    "http://172.16.0.1/media.png",
    "http://192.168.1.1/media.png",
    "http://[fc00::1]/media.png",
]


async def test_private_loopback_link_local_and_metadata_are_refused_by_default(
    internal: Internal, session: aiohttp.ClientSession
) -> None:
    http = provider(session, allow_private=False)
    before = len(internal.hits)
    for url in [*PRIVATE, *NEVER]:
        await refused(http, url.format(port=internal.port))
    assert len(internal.hits) == before, "the internal server was reached"


async def test_allowing_private_urls_still_never_allows_metadata_or_link_local(
    internal: Internal, session: aiohttp.ClientSession
) -> None:
    http = provider(session, allow_private=True)
    for url in NEVER:
        await refused(http, url.format(port=internal.port))
    # ...but loopback is allowed then (the emulator's media links), by name or address.
    for host in ("127.0.0.1", "localhost"):
        response = await http.download(internal.url(host=host))
        assert response.status == 200 and response.body == PNG
    # The connection detector sees a download's connection, so its silence in refused() counts.
    with pytest.raises(AssertionError, match="connections attempted"), no_connection("a download"):
        await http.download(internal.url())


async def test_only_http_and_https_without_credentials(
    internal: Internal, session: aiohttp.ClientSession
) -> None:
    http = provider(session, allow_private=True)
    for url in (
        "file:///etc/passwd",
        "ftp://127.0.0.1/media.png",
        "gopher://127.0.0.1:70/_x",
        "javascript:alert(1)",
        "http:///no-host",
        f"http://user:secret@127.0.0.1:{internal.port}/media.png",
        f"http://127.0.0.1:{internal.port}@169.254.169.254/",  # the host is the metadata address
        "http://127.0.0.1:99999/media.png",  # not a port
    ):
        await refused(http, url)


async def test_the_connection_goes_to_the_vetted_address_not_a_second_lookup(
    internal: Internal, session: aiohttp.ClientSession
) -> None:
    """A rebinding DNS server: the first answer passes the check, later ones point elsewhere.
    The fetch must use the first answer (the name does not exist in real DNS: if aiohttp
    looked it up itself, the download would fail)."""
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.0.0.1"]

    http = provider(session, allow_private=True, resolve=rebinding)
    response = await http.download(internal.url(host="media.rebind.test"))
    assert response.body == PNG and lookups == ["media.rebind.test"]
    assert internal.hits[-1][1]["Host"] == f"media.rebind.test:{internal.port}"

    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]  # one bad answer spoils the lot

    await refused(provider(session, allow_private=False, resolve=mixed), "http://cdn.mixed.test/a.png")

    async def nothing(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(ProviderError) as caught:
        await provider(session, allow_private=False, resolve=nothing).download("http://gone.test/a.png")
    assert caught.value.failure.kind is ErrorKind.PROVIDER_UNAVAILABLE


async def test_no_redirects_no_key_and_caps(internal: Internal, session: aiohttp.ClientSession) -> None:
    http = provider(session, allow_private=True, timeout=0.5, max_body_bytes=2048)
    # The provider key is for the provider's API only: never sent to a media host.
    await http.download(internal.url())
    assert "Authorization" not in internal.hits[-1][1]
    assert CANARY_KEY not in repr(internal.hits[-1][1])
    # A redirect is not followed (it could lead anywhere): the canary is never reached.
    with pytest.raises(ProviderError) as caught:
        await http.download(internal.url("/redirect"))
    assert "HTTP 302" in caught.value.failure.message
    assert not any(path == "/canary" for path, _ in internal.hits)
    # Size: a streamed body and a declared one over the cap are refused, not buffered.
    for path in ("/huge", "/declared-huge"):
        with pytest.raises(ProviderError) as caught:
            await http.download(internal.url(path))
        assert "2048-byte cap" in caught.value.failure.message, path
    # Time: a host that never answers is given up on after the call's timeout (0.5 s here), the
    # only way this download can end.
    with pytest.raises(ProviderError) as caught:
        await http.download(internal.url("/hang"))
    assert caught.value.failure.kind is ErrorKind.PROVIDER_TIMEOUT
    assert "within 0.5 s" in caught.value.failure.message, caught.value.failure.message
