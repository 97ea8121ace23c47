"""The coalescer's batching rules, over a ``send`` that records what it was asked to send (the
store side of Exchange is tested for real in tests/integration/test_exchange.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from charai.core.coalesce import Coalescer, error_bytes
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi import error_details
from google.rpc import code_pb2, status_pb2


def claim(n: int) -> spb.StoreCommand:
    return spb.StoreCommand(claim=spb.ClaimTaskRequest(task_id=f"task_{n}"))


class Store:
    """Answers each claim with its task id as the attempt's worker, after ``release`` is set."""

    def __init__(self, hold: bool = False) -> None:
        self.sent: list[tuple[list[str], float | None]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def send(self, commands: list[spb.StoreCommand], timeout: float | None) -> spb.ExchangeResponse:
        self.sent.append(([c.claim.task_id for c in commands], timeout))
        await self.release.wait()
        answers = [
            spb.StoreAnswer(claim=spb.ClaimTaskResponse(attempt=len(c.claim.task_id))) for c in commands
        ]
        return spb.ExchangeResponse(answers=answers)


async def test_calls_made_together_leave_as_one_exchange_and_are_answered_in_order() -> None:
    store = Store()
    coalescer = Coalescer(store.send)
    answers = await asyncio.gather(*(coalescer.call(claim(n)) for n in range(10)))
    assert [ids for ids, _ in store.sent] == [[f"task_{n}" for n in range(10)]]
    assert [a.claim.attempt for a in answers] == [len(f"task_{n}") for n in range(10)]
    assert (coalescer.calls, coalescer.commands) == (1, 10)


async def test_a_lone_command_leaves_on_the_turn_after_it_was_submitted() -> None:
    # No added wait: the task started by the turn's first command sends it when it runs (not a
    # flush scheduled first that then starts a task to send it, a turn later).
    store = Store(hold=True)
    coalescer = Coalescer(store.send)
    call = asyncio.ensure_future(coalescer.call(claim(0)))
    await asyncio.sleep(0)  # the call runs: its command is pending, the sending task started
    assert store.sent == []
    await asyncio.sleep(0)  # the sending task runs
    assert store.sent == [(["task_0"], None)]
    store.release.set()
    await call


async def test_while_calls_are_on_the_wire_the_next_commands_gather() -> None:
    store = Store(hold=True)
    coalescer = Coalescer(store.send, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.call(claim(0)))
    while not store.sent:
        await asyncio.sleep(0)
    later = [asyncio.ensure_future(coalescer.call(claim(n))) for n in range(1, 6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(store.sent) == 1  # the others wait for the call on the wire
    store.release.set()
    await asyncio.gather(first, *later)
    assert [ids for ids, _ in store.sent] == [["task_0"], [f"task_{n}" for n in range(1, 6)]]


async def test_batches_are_capped() -> None:
    store = Store()
    coalescer = Coalescer(store.send, max_batch=4, max_in_flight=8)
    await asyncio.gather(*(coalescer.call(claim(n)) for n in range(10)))
    assert [len(ids) for ids, _ in store.sent] == [4, 4, 2]


async def test_batches_are_capped_in_bytes_and_a_larger_command_leaves_alone() -> None:
    """Commands of 300 KB (a long id standing for a long prompt): at most 1 MB of them per
    Exchange; one larger than the cap leaves alone, never held back."""
    store = Store()
    coalescer = Coalescer(store.send, max_in_flight=8, max_bytes=1_000_000)
    big = [spb.StoreCommand(claim=spb.ClaimTaskRequest(task_id=f"{n}" + "x" * 300_000)) for n in range(7)]
    huge = spb.StoreCommand(claim=spb.ClaimTaskRequest(task_id="h" + "x" * 1_200_000))
    await asyncio.gather(*(coalescer.call(c) for c in [*big[:4], huge, *big[4:], claim(0)]))
    sizes = [len(ids) for ids, _ in store.sent]
    assert sizes == [3, 1, 1, 4], sizes  # 3 x 300 KB; the fourth; the huge one; 3 + the small claim
    assert [ids[0][0] for ids, _ in store.sent] == ["0", "3", "h", "4"]
    assert coalescer.commands == 9


async def test_a_refused_command_raises_its_own_error_with_its_details() -> None:
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="attempt 2 no longer holds it")

    async def send(commands: list[spb.StoreCommand], timeout: float | None) -> spb.ExchangeResponse:
        return spb.ExchangeResponse(
            answers=[
                spb.StoreAnswer(claim=spb.ClaimTaskResponse()),
                spb.StoreAnswer(error=status.SerializeToString()),
            ]
        )

    coalescer = Coalescer(send)
    ok, refused = await asyncio.gather(
        coalescer.call(claim(0)), coalescer.call(claim(1)), return_exceptions=True
    )
    assert isinstance(ok, spb.StoreAnswer)
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == "attempt 2 no longer holds it"
    assert error_details(refused).reason == ""
    assert status_pb2.Status.FromString(error_bytes(refused)) == status  # and back


async def test_a_failed_call_fails_each_of_its_commands() -> None:
    async def send(commands: list[spb.StoreCommand], timeout: float | None) -> spb.ExchangeResponse:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    coalescer = Coalescer(send)
    results = await asyncio.gather(*(coalescer.call(claim(n)) for n in range(3)), return_exceptions=True)
    assert [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)] == [
        grpc.StatusCode.UNAVAILABLE
    ] * 3


async def test_a_deadline_is_kept_and_a_command_not_yet_sent_never_leaves() -> None:
    store = Store(hold=True)
    coalescer = Coalescer(store.send, max_in_flight=1)
    on_the_wire = asyncio.ensure_future(coalescer.call(claim(0), timeout=30))
    while not store.sent:
        await asyncio.sleep(0)
    assert store.sent[0][1] is not None and 29 < store.sent[0][1] <= 30  # the call's own deadline
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await coalescer.call(claim(1), timeout=0.01)  # waits behind the held call, gives up
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    store.release.set()
    await on_the_wire
    await coalescer.close()
    assert [ids for ids, _ in store.sent] == [["task_0"]]  # task_1 gave up before it left
