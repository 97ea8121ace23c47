"""Natural batching of task_store calls into ``Exchange``: many commands per gRPC call.

Why: a unary call costs task_store about as much CPU as the command it carries (HTTP/2 stream,
interceptors, a task per call), so a worker with 64 jobs in flight paid 64 calls where one
would do. Callers still await one command each and get its own answer or its own error.

**No added wait.** Commands submitted during one turn of the event loop leave together on the
next turn; while ``max_in_flight`` calls are on the wire, later commands gather and leave as
one call as soon as one returns. An idle caller is answered as fast as with a unary call;
a busy one sends fewer, fatter calls.

**Errors.** A command the store refused ends as the ``grpc.aio.AioRpcError`` its unary RPC
would have raised (same code, message and rich details), so callers keep one error path. A
call that failed as a whole (task_store unreachable, deadline) fails each of its commands with
that error; callers already retry those as they would a unary call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from charai.store.v1 import store_service_pb2 as spb
from google.rpc import status_pb2

#: Commands per Exchange at most (task_store refuses more than 1,000).
MAX_BATCH = 256
#: Bytes of commands per Exchange at most (a command larger than this leaves alone). Why: 256
#: creates with long prompts (16,000 bytes each, within every limit) made a 4 MB message, and
#: every create of the batch failed at task_store's message limit (RESOURCE_EXHAUSTED).
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Exchange calls on the wire at once from one client.
MAX_IN_FLIGHT = 2

#: Sends one Exchange: the commands, and the call's timeout (None: the client's default).
Send = Callable[[list[spb.StoreCommand], float | None], Awaitable[spb.ExchangeResponse]]
#: A command waiting to leave: the command, its caller's future, its deadline (loop time) or None.
_Pending = tuple[spb.StoreCommand, "asyncio.Future[spb.StoreAnswer]", float | None]


def answer_error(raw: bytes) -> grpc.aio.AioRpcError:
    """The error of a refused command, as its unary RPC would have raised it."""
    status = status_pb2.Status.FromString(raw)
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", raw)) if status.details else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=status.message)


def error_bytes(exc: grpc.aio.AioRpcError) -> bytes:
    """A unary call's error as an answer's ``error`` (the inverse of :func:`answer_error`)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return bytes(value)
    code: int = exc.code().value[0]
    data: bytes = status_pb2.Status(code=code, message=exc.details() or "").SerializeToString()
    return data


def _expire(future: asyncio.Future[spb.StoreAnswer]) -> None:
    """A caller's deadline passed before its answer came."""
    if not future.done():
        future.set_exception(
            grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="Deadline Exceeded",
            )
        )


class Coalescer:
    """Sends the commands of concurrent callers as few ``Exchange`` calls (see the module)."""

    def __init__(
        self,
        send: Send,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight
        self._pending: list[_Pending] = []
        self._in_flight = 0
        self._scheduled = False
        self._calls: set[asyncio.Task[None]] = set()
        #: Exchange calls made and commands sent (metrics and tests).
        self.calls = 0
        self.commands = 0

    async def call(self, command: spb.StoreCommand, timeout: float | None = None) -> spb.StoreAnswer:
        """The command's answer; raises ``grpc.aio.AioRpcError`` as its unary RPC would.

        ``timeout``: the caller waits at most this long (DEADLINE_EXCEEDED then, and the command
        does not leave if it has not yet; one that left may still be applied, as with a unary
        call whose deadline passed). The Exchange carrying it gets the latest deadline of its
        commands."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[spb.StoreAnswer] = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        self._pending.append((command, future, deadline))
        if not self._scheduled:
            self._lead()
        # One timer per call (cheaper than wait_for's wrapper): it fails the future when due.
        timer = None if timeout is None else loop.call_later(timeout, _expire, future)
        try:
            answer = await future
        finally:
            if timer is not None:
                timer.cancel()
        if answer.WhichOneof("answer") == "error":
            raise answer_error(answer.error)
        return answer

    def _lead(self) -> None:
        """Starts the task that sends what is pending. It runs on the next turn of the loop, so
        the commands submitted until then leave with it; it sends the first batch itself (one
        turn sooner than a flush scheduled first that then starts a task to send it) and starts
        a task for each further batch that may go out."""
        self._scheduled = True
        task = asyncio.create_task(self._send_pending())
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _send_pending(self) -> None:
        self._scheduled = False
        first = self._take()
        while (batch := self._take()) is not None:
            task = asyncio.create_task(self._exchange(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        if first is not None:
            await self._exchange(first)

    def _take(self) -> list[_Pending] | None:
        """The next batch to send, counted as in flight; None while no call may go out (or
        nothing is pending)."""
        while self._pending and self._in_flight < self._max_in_flight:
            batch: list[_Pending] = []
            size = taken = 0
            for pending in self._pending[: self._max_batch]:
                if pending[1].done():  # its caller gave up
                    taken += 1
                    continue
                size += pending[0].ByteSize()
                if batch and size > self._max_bytes:
                    break
                batch.append(pending)
                taken += 1
            del self._pending[:taken]
            if batch:  # else every caller of these gave up before they left: nothing to send
                self._in_flight += 1
                return batch
        return None

    async def _exchange(self, batch: list[_Pending]) -> None:
        deadlines = [deadline for _, _, deadline in batch]
        timeout = None
        if None not in deadlines:
            timeout = max(0.0, max(d for d in deadlines if d is not None) - asyncio.get_running_loop().time())
        try:
            self.calls += 1
            self.commands += len(batch)
            response = await self._send([command for command, _, _ in batch], timeout)
        except BaseException as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
            if self._pending and not self._scheduled:
                self._lead()
        for (_, future, _), answer in zip(batch, response.answers, strict=False):
            if not future.done():
                future.set_result(answer)
        for _, future, _ in batch[len(response.answers) :]:
            if not future.done():
                future.set_exception(RuntimeError("task_store answered fewer commands than it was sent"))

    async def close(self) -> None:
        """Waits for the calls on the wire (their callers are still waiting for them)."""
        if self._calls:
            await asyncio.wait(set(self._calls))
