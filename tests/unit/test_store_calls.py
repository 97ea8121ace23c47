"""StoreCalls, the bound on a worker's task_store calls in flight: claims, outcomes and lease
renewals before progress reports. Pure asyncio: each call is a future the test answers."""

from __future__ import annotations

import asyncio

from charai.worker.attempt import Attempt
from charai.worker.progress import ProgressReporter
from charai.worker.storecalls import StoreCalls


class Calls:
    """Calls made through one StoreCalls, each held until the test ends it."""

    def __init__(self, calls: StoreCalls) -> None:
        self.calls = calls
        self.started: list[str] = []
        self._ends: dict[str, asyncio.Future[str]] = {}

    def make(self, name: str, *, report: bool = False) -> asyncio.Task[str]:
        async def call() -> str:
            self.started.append(name)
            end: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._ends[name] = end
            return await end

        return asyncio.create_task(self.calls.run(call, report=report))

    def end(self, name: str) -> None:
        self._ends[name].set_result(name)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_calls_than_the_limit_run_at_once() -> None:
    calls = Calls(StoreCalls(2))
    tasks = [calls.make(f"c{i}") for i in range(5)]
    await settle()
    assert calls.started == ["c0", "c1"]
    assert (calls.calls.in_flight, calls.calls.waiting) == (2, 3)
    calls.end("c0")
    await settle()
    assert calls.started == ["c0", "c1", "c2"]
    for name in ("c1", "c2", "c3", "c4"):
        await settle()
        calls.end(name)
    assert await asyncio.gather(*tasks) == ["c0", "c1", "c2", "c3", "c4"]
    assert (calls.calls.in_flight, calls.calls.waiting, calls.calls.peak) == (0, 0, 2)


async def test_a_freed_slot_goes_to_a_waiting_claim_before_reports_that_waited_longer() -> None:
    calls = Calls(StoreCalls(1))
    calls.make("claim-0")
    await settle()
    reports = [calls.make(f"report-{i}", report=True) for i in range(2)]
    await settle()
    claims = [calls.make(f"claim-{i}") for i in (1, 2)]
    await settle()
    for name in ("claim-0", "claim-1", "claim-2", "report-0", "report-1"):
        calls.end(name)
        await settle()
    await asyncio.gather(*reports, *claims)
    assert calls.started == ["claim-0", "claim-1", "claim-2", "report-0", "report-1"]
    assert (calls.calls.in_flight, calls.calls.waiting) == (0, 0)


async def test_a_report_runs_at_once_while_a_slot_is_free() -> None:
    calls = Calls(StoreCalls(2))
    calls.make("claim")
    report = calls.make("report", report=True)
    await settle()
    assert calls.started == ["claim", "report"]
    calls.end("report")
    assert await report == "report"


async def test_a_cancelled_waiter_gives_up_its_place_and_a_slot_handed_to_it_goes_on() -> None:
    calls = Calls(StoreCalls(1))
    calls.make("first")
    await settle()
    gone = calls.make("gone")
    later = calls.make("later", report=True)
    await settle()
    gone.cancel()  # still waiting: it leaves the line
    await settle()
    assert calls.calls.waiting == 1
    handed = calls.make("handed")
    await settle()
    calls.end("first")
    await asyncio.sleep(0)  # "first" ends and hands its slot to "handed", which has not run yet
    assert calls.calls.in_flight == 1 and "handed" not in calls.started
    handed.cancel()
    await settle()
    assert calls.started == ["first", "later"]  # the slot went on to the report
    calls.end("later")
    assert await later == "later"
    assert (calls.calls.in_flight, calls.calls.waiting) == (0, 0)


class HeldStore:
    """Stands in for ``StoreClient.report_progress`` alone: records the order reports reach it and
    holds each until the test opens ``gate``."""

    def __init__(self) -> None:
        self.reached: list[str] = []
        self.gate = asyncio.Event()

    async def report_progress(self, task_id: str, attempt: int, progress: int, stage: str) -> None:
        self.reached.append(task_id)
        await self.gate.wait()


async def test_a_heartbeats_renewal_goes_with_the_claims_and_a_progress_report_after_them() -> None:
    calls = Calls(StoreCalls(1))
    store = HeldStore()
    reporter = ProgressReporter(store, calls.calls, coalesce=0.0)  # type: ignore[arg-type]
    calls.make("claim-0")
    await settle()
    progress = asyncio.create_task(reporter.report(Attempt(None, "reported", 1)))
    await settle()
    calls.make("claim-1")
    await settle()
    renewal = asyncio.create_task(reporter.renew([Attempt(None, "renewed", 1)]))
    await settle()
    calls.end("claim-0")
    await settle()
    calls.end("claim-1")
    await settle()
    store.gate.set()
    await asyncio.gather(progress, renewal)
    assert calls.started == ["claim-0", "claim-1"]
    assert store.reached == ["renewed", "reported"]
