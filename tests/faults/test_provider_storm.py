"""The provider misbehaves for many tasks at once (the single-task versions of every row are in
tests/e2e/test_errors.py; here: scale, and the invariants).

* A burst of 429 with Retry-After among 38 tasks: only the refused calls wait, each its own
  Retry-After inside its attempt (jittered, so they come back spread out); the healthy calls go on
  meanwhile, the provider sees no second burst (exactly one 429 per rate-limited task), and each
  rate-limited task completes at its first attempt with a second call.
* A provider that allows only 8 calls at once, hit by 60: 429s, but every task completes within
  its retry budget and the rejected calls stay a bounded fraction, not a storm.
* Hangs past the timeout, 200 MiB bodies (capped at 32 MiB, not buffered: the worker's peak
  memory stays low), 200s carrying a JSON error, 500s and cut bodies, all at once beside healthy
  tasks: each ends as its row says, within the budget, and the healthy ones are unaffected.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from charai.client import CharaiClient
from charai.tasks.v1 import task_pb2

from tests.e2e.helpers import emulator_stats

from .conftest import EMULATOR_ARGS, StackFactory
from .invariants import check_invariants, seconds_of
from .load import StatsRecorder, ids, peak_rss_mib, run_id, specs, submit_all

C = task_pb2
COMPLETED, FAILED = C.TASK_STATUS_COMPLETED, C.TASK_STATUS_FAILED


RETRY_AFTER = 1.0


def calls_during_retry_after(samples: list[tuple[float, float, dict[str, Any]]]) -> list[str]:
    """Provider calls that provably arrived while a 429's Retry-After was still running.

    A 429 counted between two samples was answered after the earlier one was asked for; the
    refused call waits at least Retry-After from when its answer reaches the worker (allowing
    0.25 s for that). A rise of the call counter between two later samples that both lie inside
    that window is a call made while the refused one waited: the 429 did not stop the others.
    """
    found = []
    for i in range(1, len(samples)):
        prev_asked, _, prev = samples[i - 1]
        _, answered, cur = samples[i]
        if cur["statuses"].get("429", 0) <= prev["statuses"].get("429", 0):
            continue
        window_from, window_until = answered + 0.25, prev_asked + RETRY_AFTER
        for (asked1, _, s1), (_, answered2, s2) in itertools.pairwise(samples[i + 1 :]):
            if asked1 >= window_from and answered2 <= window_until and s2["total_calls"] > s1["total_calls"]:
                found.append(
                    f"{s2['total_calls'] - s1['total_calls']} call(s) {asked1 - answered:.2f}-"
                    f"{answered2 - answered:.2f} s after a 429 (Retry-After {RETRY_AFTER} s)"
                )
    return found


async def test_429s_hold_back_only_the_refused_calls(make_stack: StackFactory) -> None:
    """8 tasks whose first call is answered 429 (Retry-After: 1) and, submitted one every 100 ms
    meanwhile, 30 healthy ones.

    Each refused call waits Retry-After inside its attempt and calls again; the worker sends
    fewer calls at once for a while (its limit drops to the calls the provider accepted), but
    the healthy calls keep reaching the provider during those waits: no global pause. Exactly
    one 429 per rate-limited task in all (no second wave), no retry through the store.
    """
    async with make_stack() as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        limited = specs("tts", 8, "burst-429", f"[[rate*1:{RETRY_AFTER:g}]]")
        healthy = specs("tts", 30, "beside-429")

        async def trickle() -> list[task_pb2.Task]:
            created = []
            for spec in healthy:
                created += await submit_all(client, character, [spec])
                await asyncio.sleep(0.1)
            return created

        async with StatsRecorder(stack) as recorder:
            tasks = await submit_all(client, character, limited)
            tasks += await trickle()
            report = await check_invariants(
                stack, client, ids(tasks), metadata={"characterId": character}, calls_per_attempt=2
            )
        stats = recorder.samples[-1][2]
        assert stats["statuses"].get("429", 0) == len(limited), f"429s: {stats['statuses']}"
        by_text = {f.task.tts.text: f for f in report.tasks.values()}
        for spec in limited:
            facts = by_text[spec.text]
            assert (facts.task.status, facts.task.attempt, facts.calls) == (COMPLETED, 1, 2), facts.describe()
            assert not facts.retries, facts.describe()
            started, completed = (
                facts.first(C.TASK_EVENT_TYPE_STARTED),
                facts.first(C.TASK_EVENT_TYPE_COMPLETED),
            )
            assert started is not None and completed is not None, facts.describe()
            took = seconds_of(completed.time) - seconds_of(started.time)
            assert took >= RETRY_AFTER - 0.01, f"Retry-After not honoured ({took:.2f} s): {facts.describe()}"
        for spec in healthy:
            facts = by_text[spec.text]
            assert (facts.task.status, facts.calls) == (COMPLETED, 1), facts.describe()
        assert calls_during_retry_after(recorder.samples), (
            "no call reached the provider while the refused calls waited out Retry-After"
        )


async def test_a_concurrency_limited_provider_is_not_stormed(make_stack: StackFactory) -> None:
    emulator = [*EMULATOR_ARGS, "--max-concurrency", "8"]
    async with make_stack(emulator_args=emulator) as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        tasks = await submit_all(client, character, specs("tts", 40, "eight-at-once", "[[latency:0.3]]"))
        # A refused call is called again inside its attempt, up to 3 times (ProviderConfig).
        report = await check_invariants(
            stack, client, ids(tasks), metadata={"characterId": character}, deadline=90, calls_per_attempt=4
        )
        stats = await asyncio.to_thread(emulator_stats, stack)
        rejected = int(stats["concurrency"]["rejected"])
        assert all(f.task.status == COMPLETED for f in report.tasks.values()), (
            report.summary()
            + "; "
            + "; ".join(f.describe() for f in report.tasks.values() if f.task.status != COMPLETED)
        )
        assert stats["concurrency"]["peak"] <= 8
        assert rejected <= 40, f"{rejected} calls rejected for 40 tasks: the retries storm the provider"


async def test_many_misbehaving_calls_at_once(make_stack: StackFactory) -> None:
    env = {"CHARAI_TTS_TIMEOUT_SECONDS": "2"}
    async with make_stack(env=env) as stack, CharaiClient(stack.gateway_grpc) as client:
        character = run_id()
        groups = {
            # marker: (count, final status, error code, provider calls)
            "[[hang*1:30]]": (10, COMPLETED, 0, 2),
            "[[huge:200]]": (2, FAILED, C.ERROR_CODE_PROVIDER_BAD_RESPONSE, 3),
            "[[json-error-200*1:1234]]": (10, COMPLETED, 0, 2),
            "[[json-error-200]]": (5, FAILED, C.ERROR_CODE_PROVIDER_BAD_RESPONSE, 3),
            "[[server*2]]": (10, COMPLETED, 0, 3),
            "[[truncated*1]]": (10, COMPLETED, 0, 2),
            "": (20, COMPLETED, 0, 1),
        }
        items = {marker: specs("tts", n, "misbehaving", marker) for marker, (n, *_) in groups.items()}
        tasks = await submit_all(client, character, list(itertools.chain(*items.values())))
        report = await check_invariants(stack, client, ids(tasks), metadata={"characterId": character})
        by_text = {f.task.tts.text: f for f in report.tasks.values()}
        for marker, (_, status, code, calls) in groups.items():
            for spec in items[marker]:
                facts = by_text[spec.text]
                got = (facts.task.status, facts.task.error.code if status == FAILED else 0, facts.calls)
                assert got == (status, code, calls), f"{marker or 'healthy'}: {facts.describe()}"
        # Two 200 MiB bodies, each sent three times, at once: the cap stops each at 32 MiB.
        peak = peak_rss_mib(stack.pid("tts_worker"))
        assert peak < 400, f"the TTS worker peaked at {peak:.0f} MiB: bodies are buffered past the cap"
