"""The webhook sender's kept-alive connections (``charai.webhook_sender.post.Connections``) against
real HTTP servers on loopback that note which connection (the client's port) each request came
on: attempts to one receiver share connections, a host whose addresses change gets connections
to its new addresses only, no cookie travels from one attempt to the next, an answer too long
to read leaves its connection closed, and the pools are bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from charai.webhook_sender.post import MAX_ANSWER_BYTES, Answer, Connections, post


class Server:
    """Answers 204 (``/cookie``: with a ``Set-Cookie``; ``/long``: 200 with a body longer than a
    sender reads; ``/page``: 200 with a body it reads to the end, sent in two parts) and notes
    each request's client port and ``Cookie`` header."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.peers: list[int] = []
        self.cookies: list[str | None] = []
        self.first_part, self.rest = asyncio.Event(), asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername")[1])
        self.cookies.append(request.headers.get("Cookie"))
        if request.path == "/cookie":
            response = web.Response(status=204)
            response.set_cookie("session", "secret-of-one-receiver")
            return response
        if request.path == "/long":
            return web.Response(status=200, body=b"x" * (MAX_ANSWER_BYTES * 4))
        if request.path == "/page":  # the body in two parts, the second once the test says
            stream = web.StreamResponse(status=200)
            stream.content_length = 2 * 1000
            await stream.prepare(request)
            await stream.write(b"x" * 1000)
            self.first_part.set()
            await self.rest.wait()
            await stream.write(b"x" * 1000)
            return stream
        return web.Response(status=204)

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@contextlib.asynccontextmanager
async def connections(max_pools: int = 256) -> AsyncIterator[Connections]:
    pool = Connections(max_pools=max_pools)
    try:
        yield pool
    finally:
        await pool.close()


async def send(pool: Connections, url: str, addresses: list[str] | None = None) -> Answer:
    async def resolve(host: str, port: int) -> list[str]:
        assert addresses is not None
        return addresses

    head = {"webhook-id": "msg_1", "content-type": "application/json"}
    return await post(url, head, b"{}", connections=pool, timeout=10, allow_private=True, resolve=resolve)


async def test_attempts_to_one_receiver_share_its_connections() -> None:
    async with Server() as server, connections() as pool:
        url = f"http://127.0.0.1:{server.port}/in"
        for _ in range(5):
            assert (await send(pool, url)).http_status == 204
        assert len(set(server.peers)) == 1  # one after the other: one connection
        first = set(server.peers)
        server.peers.clear()
        answers = await asyncio.gather(*(send(pool, url) for _ in range(8)))
        assert [a.http_status for a in answers] == [204] * 8
        opened = set(server.peers)
        server.peers.clear()
        await asyncio.gather(*(send(pool, url) for _ in range(8)))
        assert set(server.peers) <= opened | first  # the second round opened none
        assert len(pool) == 1


async def test_a_host_whose_addresses_change_is_reached_at_its_new_ones_only() -> None:
    async with Server("127.0.0.1") as old, Server("127.0.0.2", old.port) as new, connections() as pool:
        url = f"http://hooks.test:{old.port}/in"
        assert (await send(pool, url, ["127.0.0.1"])).http_status == 204
        assert (await send(pool, url, ["127.0.0.2"])).http_status == 204
        assert (await send(pool, url, ["127.0.0.2"])).http_status == 204
        assert (len(old.peers), len(new.peers), len(pool)) == (1, 2, 2)


async def test_a_receivers_cookie_is_never_sent_back() -> None:
    async with Server() as server, connections() as pool:
        base = f"http://hooks.test:{server.port}"  # a name: cookies of bare IP addresses are dropped anyway
        await send(pool, f"{base}/cookie", ["127.0.0.1"])
        await send(pool, f"{base}/cookie", ["127.0.0.1"])
        await send(pool, f"{base}/in", ["127.0.0.1"])
        assert server.cookies == [None, None, None]
        assert len(set(server.peers)) == 1  # the same connection all along: the check means something


async def test_an_answer_with_a_body_is_read_to_its_end_and_its_connection_kept() -> None:
    async with Server() as server, connections() as pool:
        url = f"http://127.0.0.1:{server.port}/page"
        for _ in range(3):
            server.first_part.clear()
            server.rest.clear()
            attempt = asyncio.create_task(send(pool, url))
            await server.first_part.wait()
            for _ in range(50):  # the sender reads the headers and the first part
                await asyncio.sleep(0)
            server.rest.set()
            assert (await attempt).http_status == 200
        assert len(set(server.peers)) == 1


async def test_an_answer_too_long_to_read_closes_its_connection() -> None:
    async with Server() as server, connections() as pool:
        base = f"http://127.0.0.1:{server.port}"
        assert (await send(pool, f"{base}/long")).http_status == 200
        assert (await send(pool, f"{base}/in")).http_status == 204
        assert (await send(pool, f"{base}/in")).http_status == 204
        assert len(set(server.peers)) == 2
        assert server.peers[0] != server.peers[1] and server.peers[1] == server.peers[2]


@pytest.mark.parametrize("busy", [False, True])
async def test_the_least_recently_used_pool_beyond_the_bound_is_closed_once_unused(busy: bool) -> None:
    async with Server() as a, Server() as b, Server() as c, connections(max_pools=2) as pool:
        url_a = f"http://127.0.0.1:{a.port}/in"
        await send(pool, url_a)
        if busy:
            async with pool.session(url_a, ["127.0.0.1"]) as in_use:
                await send(pool, f"http://127.0.0.1:{b.port}/in")
                await send(pool, f"http://127.0.0.1:{c.port}/in")
                assert len(pool) == 2 and not in_use.closed  # evicted, but an attempt still uses it
            assert in_use.closed
        else:
            await send(pool, f"http://127.0.0.1:{b.port}/in")
            await send(pool, f"http://127.0.0.1:{c.port}/in")
            assert len(pool) == 2
        await send(pool, url_a)
        assert len(set(a.peers)) == 2  # a's pool was closed: a new connection
