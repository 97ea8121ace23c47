"""``Exchange`` calls over long-lived ``ExchangeStream`` calls: the transport of the coalescer.

Why: a unary call costs task_store ~2.5x the CPU of a message on an open stream, and the
caller's round trip is longer too (``bench.grpc_transport``; BENCHMARKS.md, "fourth pass"). A
lone command (a watched task's progress, an idle create) paid a whole unary call.

What a unary ``Exchange`` gave is kept:

- **Deadline.** Each request waits at most its timeout (DEADLINE_EXCEEDED then); the request may
  still be applied, as with a unary call whose deadline passed.
- **Waiting and retries.** A stream opens with wait-for-ready (task_store may be restarting). A
  request whose stream broke before its answer came (task_store killed, restarting, or ending
  its streams at shutdown) is sent again on a new stream, up to :data:`MAX_ATTEMPTS` times with
  backoff and within its deadline: what the channel's retry policy did for UNAVAILABLE.
- **Errors.** A request refused as a whole raises the ``AioRpcError`` the unary call raised.
- **Replicas.** One stream per address given (round robin over them); the channel's round_robin
  policy puts each new stream on the next ready replica.
- **Older task_store.** UNIMPLEMENTED sets :attr:`ExchangeStreams.supported` to False, and the
  caller goes back to unary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from charai.core.coalesce import answer_error
from charai.store.v1 import store_service_pb2 as spb

#: Sends of one request at most (the first and the re-sends after a broken stream).
MAX_ATTEMPTS = 5
#: Backoff before re-sending (seconds): doubles from the first to the last.
BACKOFF = (0.1, 2.0)
#: A broken stream's code after which its requests are sent again: UNAVAILABLE, as the unary
#: calls' retry policy; CANCELLED, a stream cut off by task_store's shutdown or ended by this
#: client after a write given up midway.
_RESEND = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _BrokenError(Exception):
    """The stream a request travelled on broke before its answer came."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


#: Takes a job task_store pushed to this client's offer (see ``WorkerOffer``).
PushHandler = Callable[[spb.PushedJob], None]


def _stamped(offer: spb.WorkerOffer, pushes: int) -> spb.WorkerOffer:
    """``offer`` as sent on a stream that had pushed ``pushes`` jobs when its slots were counted."""
    stamped = spb.WorkerOffer()
    stamped.CopyFrom(offer)
    stamped.pushes_received = pushes
    return stamped


class _Stream:
    """One open ``ExchangeStream`` call: requests written in turn, answers matched by id."""

    def __init__(self, call: Any, on_push: PushHandler | None = None) -> None:
        self._call = call
        self._on_push = on_push
        self._write = asyncio.Lock()  # one write at a time on a call
        self._waiting: dict[int, asyncio.Future[spb.ExchangeStreamResponse]] = {}
        self.ended = False
        #: Jobs task_store pushed on this stream so far (``WorkerOffer.pushes_received``).
        self.pushes = 0
        #: How the call ended (set by the reader).
        self.error = _error(grpc.StatusCode.UNAVAILABLE, "task_store ended the stream")
        self._reader = asyncio.create_task(self._read())

    async def ask(self, request: spb.ExchangeStreamRequest) -> spb.ExchangeStreamResponse:
        future: asyncio.Future[spb.ExchangeStreamResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        writing = written = False
        try:
            try:
                async with self._write:
                    writing = True
                    await self._call.write(request)
                written = True
            except Exception:  # the call ended under the write (AioRpcError, InvalidStateError, ...)
                # A failed write's own code is not the call's: the reader gets the status. When the
                # write lost a race with task_store ending the call (e.g. UNIMPLEMENTED), gRPC ends
                # it locally with INTERNAL ("execute_batch") instead: sent again on a new stream.
                await asyncio.wait([self._reader])
                if self.error.code() == grpc.StatusCode.INTERNAL:
                    broke = _error(grpc.StatusCode.UNAVAILABLE, "the stream broke under a write")
                    raise _BrokenError(broke) from None
                raise _BrokenError(self.error) from None
            return await future
        finally:
            self._waiting.pop(request.id, None)
            if writing and not written:
                self._end()  # a write that failed or was given up midway leaves the call unusable

    def _end(self) -> None:
        """No request goes on this stream any more; the next one opens a new stream."""
        self.ended = True
        self._call.cancel()

    async def _read(self) -> None:
        try:
            async for response in self._call:
                if response.HasField("pushed"):
                    self.pushes += 1
                    if self._on_push is not None:
                        self._on_push(response.pushed)
                    continue
                future = self._waiting.pop(response.id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = _error(grpc.StatusCode.CANCELLED, "the client closed the stream")
        finally:
            self.ended = True
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(_BrokenError(self.error))

    async def tell(self, make: Callable[[], spb.ExchangeStreamRequest | None]) -> bool:
        """Writes a request that gets no answer (an offer), made once it is this write's turn
        (so it is the latest; None: nothing); False if the stream broke."""
        try:
            async with self._write:
                made = make()
                if made is not None:
                    await self._call.write(made)
        except Exception:
            self._end()
            return False
        return True

    async def close(self) -> None:
        self._end()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class ExchangeStreams:
    """Sends ``ExchangeStreamRequest`` s on long-lived streams (see the module)."""

    def __init__(self, open_call: Any, streams: int = 1) -> None:
        #: Opens a new ``ExchangeStream`` call (metadata and wait-for-ready are the caller's).
        self._open_call = open_call
        self._streams: list[_Stream | None] = [None] * max(1, streams)
        self._turn = 0
        self._last_id = 0
        self._closed = False
        #: False once task_store answered UNIMPLEMENTED (an older release): use unary calls.
        self.supported = True
        #: Takes the jobs pushed to this client's offers (a worker's runner sets it).
        self.on_push: PushHandler | None = None
        #: The offer last sent: a new first stream (task_store restarted) carries it again.
        self._offer: spb.WorkerOffer | None = None
        self._reoffers: set[asyncio.Task[bool]] = set()

    async def exchange(
        self, request: spb.ExchangeStreamRequest, timeout: float | None
    ) -> spb.ExchangeResponse:
        """The response to ``request``; raises ``grpc.aio.AioRpcError`` as the unary call would."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                response = await self._send(request)
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        if response.error:
            raise answer_error(response.error)
        return response.response

    async def _send(self, request: spb.ExchangeStreamRequest) -> spb.ExchangeStreamResponse:
        delay = BACKOFF[0]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream = self._stream()
            self._last_id += 1
            request.id = self._last_id
            try:
                return await stream.ask(request)
            except _BrokenError as broken:
                code = broken.error.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    self.supported = False
                if self._closed or code not in _RESEND or attempt == MAX_ATTEMPTS:
                    raise broken.error from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])
        raise AssertionError("unreachable")

    def _stream(self) -> _Stream:
        if self._closed:
            raise _error(grpc.StatusCode.CANCELLED, "the store client is closed")
        i = self._turn % len(self._streams)
        self._turn += 1
        return self._open(i)

    def _open(self, i: int) -> _Stream:
        stream = self._streams[i]
        if stream is None or stream.ended:
            stream = self._streams[i] = _Stream(self._open_call(), self._pushed)
            if i == 0 and self._offer is not None and self._offer.slots > 0:
                # The offer ended with the broken stream: the new one stands again (the latest
                # offer when the write happens, so it never overtakes a newer one).
                task = asyncio.ensure_future(self._reoffer(stream))
                self._reoffers.add(task)
                task.add_done_callback(self._reoffers.discard)
        return stream

    async def _reoffer(self, stream: _Stream) -> bool:
        def latest() -> spb.ExchangeStreamRequest | None:
            offer = self._offer
            if offer is None or offer.slots <= 0:
                return None
            return spb.ExchangeStreamRequest(offer=_stamped(offer, stream.pushes))

        return await stream.tell(latest)

    def _pushed(self, pushed: spb.PushedJob) -> None:
        if self.on_push is not None:
            self.on_push(pushed)

    async def offer(self, offer: spb.WorkerOffer) -> bool:
        """Sends a worker's standing offer (push dispatch) on the first stream, opening it if
        needed; it replaces the previous one. False if it could not be written: the offer
        stands nowhere (a broken stream's offer ended with it)."""
        if self._closed or not self.supported:
            return False
        stream = self._open(0)  # before the offer is kept: a new stream's re-offer would send it twice
        self._offer = offer
        # Stamped with the pushes the worker had received when it counted its free slots: it
        # called this without awaiting anything since, so that is the stream's count now, not when
        # the offer is written (a push that arrives in between is not in the count: task_store
        # takes it off). Offers are written in the order they were made (the stream's write lock
        # is first come, first served), so the last one written is the latest.
        request = spb.ExchangeStreamRequest(offer=_stamped(offer, stream.pushes))
        return await stream.tell(lambda: request)

    async def close(self) -> None:
        self._closed = True
        streams = [s for s in self._streams if s is not None]
        self._streams = [None] * len(self._streams)
        await asyncio.gather(*(s.close() for s in streams))
