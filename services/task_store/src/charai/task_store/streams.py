"""``ExchangeStream``: ``Exchange`` requests as the messages of one long-lived call.

Each request read from the stream runs as the unary ``Exchange`` would run it (its own asyncio
task, so requests of one stream overlap as concurrent calls did) and its response, carrying the
request's ``id``, is written as soon as it is done. A request refused as a whole is answered with
``error``; the stream goes on. At shutdown (:meth:`Drain.start`) every stream stops reading,
answers what it has read and ends with status OK, so ``server.stop`` does not wait out its grace
for streams that would never end by themselves; the clients send what was not read to a task_store
that is up (``charai.core.exchange_stream``). A worker's stream also carries its standing offer
and the jobs pushed to it (:mod:`charai.task_store.push`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.push import Offers, Outlet

#: Answers one request as the unary ``Exchange`` (a whole-request refusal as ``error``).
Answer = Callable[[spb.ExchangeStreamRequest], Awaitable[spb.ExchangeStreamResponse]]

#: Put on a stream's queue: stop reading, answer what was read, end.
_STOP = object()
_Item = spb.ExchangeStreamResponse | object


class Drain:
    """Tells every open ``ExchangeStream`` to end (task_store is shutting down)."""

    def __init__(self) -> None:
        self.started = False
        self._queues: set[asyncio.Queue[_Item]] = set()

    def start(self) -> None:
        self.started = True
        for queue in self._queues:
            queue.put_nowait(_STOP)

    def add(self, queue: asyncio.Queue[_Item]) -> None:
        self._queues.add(queue)
        if self.started:
            queue.put_nowait(_STOP)

    def discard(self, queue: asyncio.Queue[_Item]) -> None:
        self._queues.discard(queue)

    @property
    def open_streams(self) -> int:
        """How many streams are open (``charai_exchange_streams_open``)."""
        return len(self._queues)


async def serve(
    requests: AsyncIterator[spb.ExchangeStreamRequest],
    answer: Answer,
    drain: Drain,
    offers: Offers | None = None,
) -> AsyncIterator[spb.ExchangeStreamResponse]:
    """The responses of one stream, each as soon as its request is answered (see the module),
    and the jobs pushed to its worker's offer (``offers``: push dispatch is on)."""
    out: asyncio.Queue[_Item] = asyncio.Queue()
    outlet = Outlet(out, asyncio.get_running_loop())
    running: set[asyncio.Task[None]] = set()

    async def one(request: spb.ExchangeStreamRequest) -> None:
        response = await answer(request)
        response.id = request.id
        out.put_nowait(response)

    async def read() -> None:
        try:
            async for request in requests:
                if request.HasField("offer"):  # a standing offer: recorded, not answered
                    if offers is not None:
                        offers.offer(outlet, request.offer)
                    continue
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            if offers is not None:
                offers.drop(outlet)  # no push after the last read
            out.put_nowait(_STOP)  # the client closed its side (or the call ended)

    drain.add(out)
    reader = asyncio.create_task(read())
    try:
        while isinstance(item := await out.get(), spb.ExchangeStreamResponse):
            yield item
        reader.cancel()  # read nothing more: what was read is answered below
        while running:
            await asyncio.wait(set(running))
        while not out.empty():
            if isinstance(item := out.get_nowait(), spb.ExchangeStreamResponse):
                yield item
    finally:
        if offers is not None:
            offers.drop(outlet)
        drain.discard(out)
        reader.cancel()
        for task in running:
            task.cancel()  # the call is gone (cancelled): nobody waits for these answers
