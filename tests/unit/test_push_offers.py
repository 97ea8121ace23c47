"""The registry of workers' standing offers (charai.task_store.push.Offers): what a create may
take, what a rolled-back push gives back, and what an ended stream leaves."""

from __future__ import annotations

import asyncio
import threading

from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.push import Offers, Outlet, pushed_response
from charai.tasks.v1 import task_pb2

TTS, IMAGE = task_pb2.TASK_TYPE_TTS_GENERATION, task_pb2.TASK_TYPE_IMAGE_GENERATION


def outlet() -> tuple[Outlet, asyncio.Queue[object]]:
    queue: asyncio.Queue[object] = asyncio.Queue()
    return Outlet(queue, asyncio.get_running_loop()), queue


def offer(worker: str, slots: int, *types: int) -> spb.WorkerOffer:
    return spb.WorkerOffer(worker_id=worker, types=types or (TTS,), slots=slots)  # type: ignore[arg-type]


async def test_each_take_spends_a_slot_of_an_offer_for_that_type() -> None:
    offers, (out, _) = Offers(30.0), outlet()
    offers.offer(out, offer("w1", 2))
    assert offers.take(IMAGE) is None
    assert offers.take(TTS) == (out, "w1")
    assert offers.take(TTS) == (out, "w1")
    assert offers.take(TTS) is None
    assert offers.pushed == 2 and offers.open == 0


async def test_a_new_offer_replaces_the_last_and_zero_withdraws_it() -> None:
    offers, (out, _) = Offers(30.0), outlet()
    offers.offer(out, offer("w1", 5))
    offers.offer(out, offer("w1", 1))
    assert offers.take(TTS) is not None
    assert offers.take(TTS) is None
    offers.offer(out, offer("w1", 3))
    offers.offer(out, offer("w1", 0))
    assert offers.take(TTS) is None and offers.open == 0


async def test_a_slot_given_back_can_be_taken_again() -> None:
    offers, (out, _) = Offers(30.0), outlet()
    offers.offer(out, offer("w1", 1))
    taken = offers.take(TTS)
    assert taken is not None
    offers.give_back(taken[0])
    assert offers.pushed == 0
    assert offers.take(TTS) == (out, "w1")


async def test_an_ended_stream_is_offered_nothing_and_sends_nothing() -> None:
    offers, (out, queue) = Offers(30.0), outlet()
    offers.offer(out, offer("w1", 4))
    offers.drop(out)
    assert offers.take(TTS) is None
    offers.offer(out, offer("w1", 4))  # an offer read after the end does not stand
    assert offers.take(TTS) is None
    out.send(spb.ExchangeStreamResponse())
    await asyncio.sleep(0)
    assert queue.empty()


async def test_offers_are_spread_over_the_workers_in_turn() -> None:
    offers, (a, _), (b, _) = Offers(30.0), outlet(), outlet()
    offers.offer(a, offer("a", 10))
    offers.offer(b, offer("b", 10))
    workers = [taken[1] for taken in (offers.take(TTS) for _ in range(4)) if taken is not None]
    assert workers == ["a", "b", "a", "b"]


async def test_a_push_sent_from_another_thread_arrives_on_the_stream() -> None:
    offers, (out, queue) = Offers(30.0), outlet()
    offers.offer(out, offer("w1", 1))
    job = spb.Job(task_id="t", dispatch_gen=1, type=TTS)
    claim = spb.ClaimTaskResponse(outcome=spb.CLAIM_OUTCOME_RUN, attempt=1, lease_seconds=30.0)
    thread = threading.Thread(target=out.send, args=(pushed_response(job, claim),))
    thread.start()
    thread.join()
    sent = await asyncio.wait_for(queue.get(), timeout=10)
    assert isinstance(sent, spb.ExchangeStreamResponse)
    assert sent.id == 0 and sent.pushed.job.task_id == "t" and sent.pushed.claim.attempt == 1


async def test_a_commits_pushes_are_sent_each_on_its_stream_and_counted() -> None:
    offers, (a, qa), (b, qb) = Offers(30.0), outlet(), outlet()
    counted: list[int] = []
    offers.on_sent = counted.append
    first = spb.ExchangeStreamResponse(pushed=spb.PushedJob(job=spb.Job(task_id="t1")))
    second = spb.ExchangeStreamResponse(pushed=spb.PushedJob(job=spb.Job(task_id="t2")))
    offers.send([(a, first), (b, second)])
    got_a = await asyncio.wait_for(qa.get(), timeout=10)
    got_b = await asyncio.wait_for(qb.get(), timeout=10)
    assert (got_a, got_b) == (first, second)
    assert counted == [2]
