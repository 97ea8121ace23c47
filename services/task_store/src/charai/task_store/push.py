"""Push dispatch: workers' standing offers, and the jobs claimed for them in a create's own
transaction (``WorkerOffer`` in ``store_service.proto`` has the protocol).

Why: a job that goes through JetStream costs a publish, a delivery, a claim round trip and its
commit before the task starts, about half of a new task's pickup time (bench B1, "leg 2"), and
per task a publish, a fetch, an ack and a claim command of CPU (bench B2). A worker that waits
with free slots can instead be handed the claim itself.

The registry is read by creates on the database thread (SQLite runs units on a thread of its
own) and written by the event loop's stream handlers, hence its lock. A push is sent after the
commit (:attr:`Unit.pushed`); what the commit does not reach, nobody is pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from charai.store.v1 import store_service_pb2 as spb


class Outlet:
    """One ExchangeStream's way out: messages put here are written on the stream, in order."""

    def __init__(self, queue: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop
        #: The stream ended: nothing put here any more is read.
        self.closed = False
        #: Jobs pushed on this stream so far (slots taken, less those given back): what an offer
        #: stamped with ``pushes_received`` has not seen is still on its way (``Offers.offer``).
        self.pushes = 0

    def send(self, response: spb.ExchangeStreamResponse) -> None:
        """Queues ``response`` on the stream, from any thread."""
        if self.closed:
            return  # the attempt's lease expires and the sweeper re-dispatches it
        with contextlib.suppress(RuntimeError):  # the loop is closed: task_store is stopping
            self._loop.call_soon_threadsafe(self._queue.put_nowait, response)


@dataclasses.dataclass(slots=True)
class _Offer:
    worker_id: str
    types: frozenset[int]
    slots: int


class Offers:
    """The standing offers of the open ExchangeStreams, one per stream."""

    def __init__(self, lease_seconds: float) -> None:
        self._lock = threading.Lock()
        self._offers: dict[Outlet, _Offer] = {}
        #: The lease a pushed claim tells its worker about (as ClaimTaskResponse.lease_seconds).
        self.lease_seconds = lease_seconds
        #: Jobs pushed so far (tests): slots taken, less those given back.
        self.pushed = 0
        #: Called with how many pushes a commit sent (the metrics' counter; any thread).
        self.on_sent: Callable[[int], None] | None = None

    def offer(self, outlet: Outlet, offer: spb.WorkerOffer) -> None:
        """Records (or with no slots, withdraws) the stream's offer, less the slots of the jobs
        pushed on the stream that the worker had not received when it counted its slots."""
        with self._lock:
            slots = int(offer.slots)
            if offer.HasField("pushes_received"):
                slots -= max(0, outlet.pushes - int(offer.pushes_received))
            if slots <= 0 or not offer.types or outlet.closed:
                self._offers.pop(outlet, None)
                return
            self._offers[outlet] = _Offer(offer.worker_id, frozenset(offer.types), slots)

    def drop(self, outlet: Outlet) -> None:
        """The stream ended: its offer goes with it."""
        outlet.closed = True
        with self._lock:
            self._offers.pop(outlet, None)

    def take(self, task_type: int) -> tuple[Outlet, str] | None:
        """Spends one slot of an offer for ``task_type``: the stream and the worker's id."""
        with self._lock:
            for outlet, offer in self._offers.items():
                if offer.slots > 0 and task_type in offer.types and not outlet.closed:
                    offer.slots -= 1  # kept at 0 until the worker's next offer or its stream's end
                    outlet.pushes += 1
                    self.pushed += 1
                    # To the back: the workers that offer take turns.
                    del self._offers[outlet]
                    self._offers[outlet] = offer
                    return outlet, offer.worker_id
        return None

    def send(self, pushed: list[tuple[Outlet, spb.ExchangeStreamResponse]]) -> None:
        """Sends what a commit pushed, each on its stream."""
        for outlet, response in pushed:
            outlet.send(response)
        if self.on_sent is not None:
            self.on_sent(len(pushed))

    def give_back(self, outlet: Outlet) -> None:
        """Returns a slot :meth:`take` spent on a job that was not pushed after all."""
        with self._lock:
            self.pushed -= 1
            outlet.pushes -= 1
            offer = self._offers.get(outlet)
            if offer is not None:
                offer.slots += 1

    @property
    def slots(self) -> int:
        """Free slots offered over every open stream (tests)."""
        with self._lock:
            return sum(offer.slots for offer in self._offers.values())

    @property
    def open(self) -> int:
        """How many streams have an offer with a free slot standing."""
        with self._lock:
            return sum(1 for offer in self._offers.values() if offer.slots > 0)


def pushed_response(job: spb.Job, claim: spb.ClaimTaskResponse) -> spb.ExchangeStreamResponse:
    """The message that hands a claimed job to its worker."""
    return spb.ExchangeStreamResponse(pushed=spb.PushedJob(job=job, claim=claim))
