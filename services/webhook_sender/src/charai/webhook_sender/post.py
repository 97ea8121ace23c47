"""One attempt: the payload (Standard Webhooks), its signatures, the POST and what came back.

The body is built from the event as task_store stored it (the task as the REST JSON shows it),
so every attempt of one delivery carries the same ``webhook-id`` and, media URLs aside (they are
signed again), the same body. ``webhook-timestamp`` is the attempt's time, as the standard asks
(receivers reject stale timestamps).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from charai.core.validation import whole_number
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi.json import task_json
from charai.tasks.v1 import task_pb2
from charai.worker.egress import EgressRefusedError, Resolve, pinned_connector, system_resolve, vet_url
from standardwebhooks.webhooks import Webhook

#: Payloads stay under this (the issue's ~20 kB): past it the task's input is left out.
MAX_PAYLOAD_BYTES = 20_000
#: An answer's body is read to its end up to this size (its connection is then kept).
MAX_ANSWER_BYTES = 65_536
#: ``http_status`` of an attempt refused before sending (the URL's host is not allowed).
REFUSED = -1
USER_AGENT = "charai-webhooks/1"


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What one attempt got: the HTTP status (0: none; -1: refused before sending), how long it
    took, what went wrong, and the receiver's ``Retry-After`` in seconds (None: not given)."""

    http_status: int
    latency: float
    error: str = ""
    retry_after: float | None = None


def payload(
    claim: spb.ClaimWebhookDeliveryResponse, present: Callable[[task_pb2.Task], task_pb2.Task]
) -> bytes:
    """``{"type": "task.completed", "timestamp": …, "data": <task JSON>}``, compact UTF-8."""
    copy = task_pb2.Task()
    copy.CopyFrom(claim.event.task)  # present() signs media URLs in place
    task = present(copy)
    body: dict[str, Any] = {
        "type": claim.event_type,
        "timestamp": claim.event.time.ToJsonString(),
        "data": {**task_json(task), "sequence": claim.event.sequence},
    }
    data = _dump(body)
    if len(data) > MAX_PAYLOAD_BYTES:
        body["data"]["payload"] = None  # the input is the client's own; the result matters here
        data = _dump(body)
    return data


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def headers(delivery_id: str, secrets: Sequence[str], body: bytes, now: dt.datetime) -> dict[str, str]:
    """The Standard Webhooks headers: one ``v1,`` signature per secret (two while a rotation's
    grace lasts), space-separated."""
    signatures = " ".join(Webhook(secret).sign(delivery_id, now, body) for secret in secrets)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Reads the answer's body (not used) to its end, so that its connection can carry the next
    attempt; one longer than :data:`MAX_ANSWER_BYTES` is left, and its connection closed."""
    received = 0
    while received <= MAX_ANSWER_BYTES and not response.content.at_eof():
        chunk = await response.content.read(16_384)
        if not chunk:
            return
        received += len(chunk)


def retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if whole_number(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Connections:
    """Connections kept alive between attempts, one pool per destination: the URL's scheme, host
    and port with the addresses they were vetted to (:func:`vet_url` runs before every attempt,
    so a host whose addresses change gets a new pool, and no connection ever goes to an address
    that was not vetted). A receiver getting many deliveries is not paid a TCP (and TLS)
    handshake for each. An idle connection is closed after ``idle_seconds``, below the 5 s many
    servers keep one (Node.js, uvicorn), so that a server rarely closes one just as it is
    reused. At most ``max_pools`` destinations are kept; the least recently used pool beyond
    that is closed once no attempt uses it. No cookies are kept: receivers never see another's.
    """

    def __init__(self, *, idle_seconds: float = 4.0, max_pools: int = 256) -> None:
        self._idle = idle_seconds
        self._max = max_pools
        self._pools: collections.OrderedDict[tuple[object, ...], _Pool] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._pools)

    @contextlib.asynccontextmanager
    async def session(self, url: str, addresses: list[str]) -> AsyncIterator[aiohttp.ClientSession]:
        """The pool's session for ``url`` at its vetted ``addresses``, for one attempt."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port, tuple(addresses))
        pool = self._pools.get(key)
        if pool is None:
            connector = pinned_connector(addresses, keep_alive=self._idle)
            session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
            pool = self._pools[key] = _Pool(session)
            await self._evict()
        else:
            self._pools.move_to_end(key)
        pool.users += 1
        try:
            yield pool.session
        finally:
            pool.users -= 1
            if pool.evicted and not pool.users:
                await pool.session.close()

    async def _evict(self) -> None:
        while len(self._pools) > self._max:
            _, pool = self._pools.popitem(last=False)
            pool.evicted = True
            if not pool.users:
                await pool.session.close()

    async def close(self) -> None:
        """Closes every pool (attempts still running lose their connections)."""
        pools, self._pools = list(self._pools.values()), collections.OrderedDict()
        for pool in pools:
            await pool.session.close()


@dataclasses.dataclass(slots=True)
class _Pool:
    session: aiohttp.ClientSession
    users: int = 0
    evicted: bool = False


async def post(
    url: str,
    head: dict[str, str],
    body: bytes,
    *,
    connections: Connections,
    timeout: float,
    allow_private: bool,
    resolve: Resolve = system_resolve,
) -> Answer:
    """POSTs ``body`` once: no redirects followed (a 3xx is the receiver's answer)."""
    started = time.monotonic()
    try:
        addresses = await vet_url(url, allow_private=allow_private, resolve=resolve)
    except EgressRefusedError as refused:
        if refused.unresolved:  # may resolve later: retried like a connection error
            return Answer(0, time.monotonic() - started, refused.reason)
        return Answer(REFUSED, 0.0, f"refused: a URL {refused.reason}")
    try:
        async with (
            connections.session(url, addresses) as session,
            session.post(
                url,
                data=body,
                headers=head,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response,
        ):
            await _drain(response)
            status = response.status
            wait = retry_after(response.headers.get("Retry-After"), time.time())
    except TimeoutError:
        return Answer(0, time.monotonic() - started, f"no answer within {timeout:g} s")
    except aiohttp.ClientError as exc:
        return Answer(0, time.monotonic() - started, f"{type(exc).__name__}: {exc}"[:300])
    except OSError as exc:
        return Answer(0, time.monotonic() - started, f"{type(exc).__name__}: {exc.strerror or exc}"[:300])
    latency = time.monotonic() - started
    if 300 <= status < 400:
        return Answer(status, latency, f"redirect ({status}) not followed", wait)
    if not 200 <= status < 300:
        return Answer(status, latency, f"HTTP {status}", wait)
    return Answer(status, latency, "", wait)
