"""Pull requests to one JetStream consumer (a priority lane), at the protocol level.

nats-py's ``fetch`` hides when a pull request ends; the runner needs two kinds of request per
lane and to know exactly when each is over: a *probe* (``no_wait``: take what is there now, up to
a batch) and a *long poll* (wait up to ``expires`` for one message, so an idle worker picks a job up
within a millisecond of its publication). Every data message, whichever request brought it, goes
to ``on_message``; status messages (404 no messages, 408 expired, 409) only end requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext


class Lane:
    """One priority lane of one worker kind: a durable pull consumer."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        name: str,
        rank: int,
        on_message: Callable[[Lane, Msg], None],
        on_idle: Callable[[], None],
    ) -> None:
        self._nc = nc
        self.name = name
        self.rank = rank  # 0 = highest priority
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self._on_idle = on_idle
        self._probe_sub: Subscription | None = None
        self._poll_sub: Subscription | None = None
        self._probe_inbox = nc.new_inbox()
        self._poll_inbox = nc.new_inbox()
        self._probe_wanted = 0
        self._probe_got = 0
        self._probe_done: asyncio.Future[int] | None = None
        self._poll_deadline = 0.0

    async def start(self) -> None:
        self._probe_sub = await self._nc.subscribe(self._probe_inbox, cb=self._probe_cb)
        self._poll_sub = await self._nc.subscribe(self._poll_inbox, cb=self._poll_cb)

    async def close(self) -> None:
        for sub in (self._probe_sub, self._poll_sub):
            if sub is not None:
                with contextlib.suppress(Exception):  # the connection may be closed already
                    await sub.unsubscribe()
        if self._probe_done is not None and not self._probe_done.done():
            self._probe_done.set_result(self._probe_got)

    @property
    def polling(self) -> bool:
        return self._poll_deadline > asyncio.get_running_loop().time()

    async def probe(self, batch: int, timeout: float = 2.0) -> int:
        """Takes up to ``batch`` messages that are available now; returns how many came."""
        loop = asyncio.get_running_loop()
        self._probe_wanted, self._probe_got = batch, 0
        self._probe_done = loop.create_future()
        request = json.dumps({"batch": batch, "no_wait": True}).encode()
        await self._nc.publish(self._next_subject, request, reply=self._probe_inbox)
        try:
            async with asyncio.timeout(timeout):
                return await self._probe_done
        except TimeoutError:
            return self._probe_got
        finally:
            self._probe_done = None

    async def long_poll(self, expires: float) -> None:
        """Asks for one message, waiting up to ``expires`` seconds on the server side."""
        if self.polling:
            return
        loop = asyncio.get_running_loop()
        # Local deadline a little past the server's, in case the 408 is lost in a reconnect.
        self._poll_deadline = loop.time() + expires + 1.0
        request = json.dumps({"batch": 1, "expires": int(expires * 1e9)}).encode()
        await self._nc.publish(self._next_subject, request, reply=self._poll_inbox)

    async def _probe_cb(self, msg: Msg) -> None:
        if JetStreamContext.is_status_msg(msg):
            self._finish_probe()
            return
        self._probe_got += 1
        self._on_message(self, msg)
        if self._probe_got >= self._probe_wanted:
            self._finish_probe()

    def _finish_probe(self) -> None:
        if self._probe_done is not None and not self._probe_done.done():
            self._probe_done.set_result(self._probe_got)

    async def _poll_cb(self, msg: Msg) -> None:
        self._poll_deadline = 0.0  # batch 1: any answer ends the request
        if JetStreamContext.is_status_msg(msg):
            self._on_idle()
            return
        self._on_message(self, msg)
