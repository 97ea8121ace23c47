"""Every row of DESIGN.md section 4's error table, end to end: the emulator misbehaves as a
prompt marker asks, and the task ends as the table says, after exactly the provider calls that
implies (counted by the emulator) and with one RETRY_SCHEDULED event per retry.

The cases are independent, so each group runs concurrently once per module (a fixture) and the
parametrized tests below check one case each. Rate-limit cases run apart from the rest: a 429
lowers the worker's limit on calls in flight to that provider (to one, when it is the only call),
which would slow the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2

from tests.e2e.conftest import fast_stack

from .helpers import (
    CODE_NAME,
    STATUS_NAME,
    check_one_terminal_at_end,
    check_sequences,
    collect,
    describe,
    history,
    provider_calls,
    seconds,
    terminal_counts,
    unique,
)

C = task_pb2
COMPLETED, FAILED = C.TASK_STATUS_COMPLETED, C.TASK_STATUS_FAILED
AUTH, CONTENT, INVALID = (
    C.ERROR_CODE_PROVIDER_AUTH,
    C.ERROR_CODE_CONTENT_REJECTED,
    C.ERROR_CODE_INVALID_REQUEST,
)
QUOTA, RATE = C.ERROR_CODE_QUOTA_EXHAUSTED, C.ERROR_CODE_RATE_LIMITED
UNAVAILABLE, TIMEOUT = C.ERROR_CODE_PROVIDER_UNAVAILABLE, C.ERROR_CODE_PROVIDER_TIMEOUT
BAD = C.ERROR_CODE_PROVIDER_BAD_RESPONSE
KEY_SETTING = {"image": "CHARAI_IMAGE_API_KEY", "tts": "CHARAI_TTS_API_KEY"}
CONTENT_MESSAGE = "unsafe or sensitive content"


@dataclasses.dataclass(frozen=True)
class Case:
    """One provider behaviour on one route and how the task must end.

    Attributes:
        code: the final error code (FAILED), or 0 (COMPLETED).
        calls: generation calls the provider must see.
        attempts: the task's attempts (1 + RETRY_SCHEDULED events); 0: one per call. Fewer
            when a 429 with a short Retry-After is called again inside its attempt.
        retry_code: the error code every RETRY_SCHEDULED event carries.
        message: text the final error message must contain.
        provider_status / provider_code: expected on the final error, when set.
        min_retry_delay: each RETRY_SCHEDULED's next_attempt_time is at least this far after it.
        note: why the expectation holds (shown when it does not).
    """

    route: str
    marker: str
    code: int
    calls: int
    attempts: int = 0
    retry_code: int = 0
    message: str = ""
    provider_status: int = 0
    provider_code: str = ""
    min_retry_delay: float = 0.0
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.route}-{self.marker.strip('[]')}"

    @property
    def status(self) -> int:
        return FAILED if self.code else COMPLETED

    @property
    def expected_attempts(self) -> int:
        return self.attempts or self.calls


def fails_at_once(route: str) -> list[Case]:
    key = KEY_SETTING[route]
    content_status = 400 if route == "tts" else 0  # the async image job ends FAIL inside a 200
    return [
        Case(route, "[[auth]]", AUTH, 1, message=key, provider_status=401, provider_code="1000"),
        Case(route, "[[forbidden]]", AUTH, 1, message=key, provider_status=403, provider_code="1220"),
        Case(
            route,
            "[[content]]",
            CONTENT,
            1,
            message=CONTENT_MESSAGE,
            provider_status=content_status,
            provider_code="1301",
        ),
        Case(
            route,
            "[[invalid]]",
            INVALID,
            1,
            message="Invalid parameter",
            provider_status=400,
            provider_code="1214",
        ),
        Case(
            route, "[[model]]", INVALID, 1, message="Unknown Model", provider_status=400, provider_code="1211"
        ),
        Case(
            route,
            "[[too-long]]",
            INVALID,
            1,
            message="exceeds max length",
            provider_status=400,
            provider_code="1261",
        ),
        Case(
            route,
            "[[quota]]",
            QUOTA,
            1,
            message="Insufficient balance",
            provider_status=429,
            provider_code="1113",
        ),
    ]


def retried(route: str) -> list[Case]:
    return [
        Case(route, "[[server*2]]", 0, 3, retry_code=UNAVAILABLE),
        Case(route, "[[server]]", UNAVAILABLE, 4, retry_code=UNAVAILABLE, note="1 call + 3 retries"),
        Case(route, "[[zhipu-500*1]]", 0, 2, retry_code=UNAVAILABLE),
        Case(
            route,
            "[[zhipu-500]]",
            UNAVAILABLE,
            4,
            retry_code=UNAVAILABLE,
            provider_code="1234",
            note="1 call + 3 retries",
        ),
        Case(
            route, "[[hang*1:30]]", 0, 2, retry_code=TIMEOUT, note="the first call outlives the 3 s timeout"
        ),
    ]


def bad_responses(route: str) -> list[Case]:
    permanent = ["truncated", "bad-b64", "wrong-type", "garbage", "redirect"]
    cases = [Case(route, f"[[{m}]]", BAD, 3, retry_code=BAD, note="1 call + 2 retries") for m in permanent]
    # 64 MiB, chunked with no Content-Length: the worker must stop reading at its 32 MiB cap.
    cases.append(
        Case(route, "[[huge:64]]", BAD, 3, retry_code=BAD, message="cap", note="capped, not buffered")
    )
    cases += [
        Case(
            route,
            "[[json-error-200:9999]]",
            BAD,
            3,
            retry_code=BAD,
            note="a 200 whose body is a JSON error with an unknown code",
        ),
        Case(
            route,
            "[[json-error-200]]",
            BAD,
            3,
            retry_code=BAD,
            note="DESIGN.md section 4: '200 with a JSON error body' is PROVIDER_BAD_RESPONSE, retried once "
            "or twice then failed (the emulator's default in-band code is 1301)",
        ),
        Case(route, "[[garbage*1]]", 0, 2, retry_code=BAD),
    ]
    return cases


def rate_limits(route: str) -> list[Case]:
    return [
        Case(
            route,
            "[[rate*2:1]]",
            0,
            3,
            attempts=1,
            note="a 429 with Retry-After: 1 is called again inside the attempt, up to 3 times",
        ),
        Case(
            route,
            "[[rate*4:1]]",
            0,
            5,
            attempts=2,
            retry_code=RATE,
            min_retry_delay=0.95,
            note="4 calls of the first attempt refused; Retry-After: 1 is a floor for the retry delay",
        ),
        Case(route, "[[overload*1]]", 0, 2, retry_code=RATE),
    ]


ROUTES = ("image", "tts")
MAIN_CASES = [c for r in ROUTES for c in fails_at_once(r) + retried(r) + bad_responses(r)]
RATE_CASES = [c for r in ROUTES for c in rate_limits(r)]


@dataclasses.dataclass
class Outcome:
    case: Case
    text: str = ""
    task_id: str = ""
    live: list[task_pb2.TaskEvent] = dataclasses.field(default_factory=list)
    log: list[task_pb2.TaskEvent] = dataclasses.field(default_factory=list)
    calls: int = -1
    terminal_events: int = -1
    error: BaseException | None = None


async def run_case(client: CharaiClient, stack: Stack, case: Case, run: str) -> Outcome:
    outcome = Outcome(case)
    outcome.text = f"{unique(case.id)} says hello {case.marker}"
    metadata = {"e2eRun": run}
    try:
        if case.route == "image":
            task = await client.create_image(
                "char_errors", outcome.text, resolution="1024x1024", metadata=metadata
            )
        else:
            task = await client.create_tts("char_errors", outcome.text, metadata=metadata)
        outcome.task_id = task.id
        outcome.live = await collect(client, task.id, timeout=40)
        outcome.log = await history(client, task.id, timeout=20)
        outcome.calls = await provider_calls(stack, outcome.text)
    except BaseException as exc:  # reported by the case's own test
        outcome.error = exc
    return outcome


async def run_group(client: CharaiClient, stack: Stack, cases: Sequence[Case]) -> dict[str, Outcome]:
    run = unique("run").replace(" ", "_")
    results = await asyncio.gather(*(run_case(client, stack, c, run) for c in cases))
    ids = [o.task_id for o in results if o.task_id]
    try:
        counts = await terminal_counts(client, stack, {"e2eRun": run}, ids)
    except (TimeoutError, AssertionError):
        counts = {}
    for outcome in results:
        outcome.terminal_events = counts.get(outcome.task_id, -1)
    return {o.case.id: o for o in results}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # Short provider timeouts: the timeout row must not take long to show. Each row is one task's
    # own handling of one answer, so each worker adapts on its own: with the credential's shared
    # breaker, the first auth or quota refusal would fail every other row's task at once, without
    # a provider call (that behaviour is tests/integration/test_provider_sharing.py's).
    async with fast_stack(
        tmp_path_factory,
        CHARAI_IMAGE_TIMEOUT_SECONDS="3",
        CHARAI_TTS_TIMEOUT_SECONDS="3",
        CHARAI_PROVIDER_SHARED_LIMITS="false",
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def main_outcomes(client: CharaiClient, stack: Stack) -> dict[str, Outcome]:
    return await run_group(client, stack, MAIN_CASES)


@pytest_asyncio.fixture(scope="module")
async def rate_outcomes(client: CharaiClient, stack: Stack) -> dict[str, Outcome]:
    # One case at a time per worker: the image and TTS workers have separate gates (limits), so
    # the two chains run side by side; inside a chain the cases run one after the other.
    async def chain(route: str) -> dict[str, Outcome]:
        found: dict[str, Outcome] = {}
        for case in rate_limits(route):
            found.update(await run_group(client, stack, [case]))
        return found

    parts = await asyncio.gather(*(chain(r) for r in ROUTES))
    return {k: v for part in parts for k, v in part.items()}


def check(outcome: Outcome) -> None:
    case = outcome.case
    where = f"{case.id} ({outcome.task_id or 'no task'}, text {outcome.text!r})"
    if outcome.error is not None:
        raise AssertionError(f"{where}: the run failed: {outcome.error!r}") from outcome.error
    live, log = outcome.live, outcome.log

    # The live stream: a snapshot first, then changes, ending with the one terminal event.
    assert live and live[0].type == C.TASK_EVENT_TYPE_SNAPSHOT, f"{where}: live: {describe(live)}"
    check_sequences(live, f"{where} live stream")
    if len(live) == 1:
        # The task ended before the watch opened (a one-call failure can take milliseconds):
        # the snapshot alone is the whole live stream, and it must already be terminal.
        assert live[0].task.status in TERMINAL_STATUSES, f"{where}: live: {describe(live)}"
    else:
        check_one_terminal_at_end(live, f"{where} live stream")
    # The replayed log: the same story in full, and the live stream is a suffix of it (no gap).
    check_sequences(log, f"{where} replayed log")
    check_one_terminal_at_end(log, f"{where} replayed log")
    tail = [(e.sequence, e.type) for e in live[1:]]
    assert [(e.sequence, e.type) for e in log[len(log) - len(tail) :]] == tail, (
        f"{where}: live {describe(live)} is not the end of the log {describe(log)}"
    )
    assert live[0].sequence in {e.sequence for e in log} | {1}, f"{where}: snapshot not in log"
    assert outcome.terminal_events == 1, (
        f"{where}: the event log (WatchTasks replay) holds {outcome.terminal_events} terminal events"
    )

    final = log[-1].task
    expected = STATUS_NAME(case.status)
    got = STATUS_NAME(final.status)
    got_code = CODE_NAME(final.error.code)
    assert (got, got_code if case.code else "") == (expected, CODE_NAME(case.code) if case.code else ""), (
        f"{where}: expected {expected} {CODE_NAME(case.code) if case.code else ''}, got {got} {got_code} "
        f"({final.error.message!r}); {case.note}; events: {describe(log)}; provider calls: {outcome.calls}"
    )
    assert outcome.calls == case.calls, (
        f"{where}: the provider got {outcome.calls} calls, expected {case.calls} ({case.note}); "
        f"events: {describe(log)}"
    )
    attempts = case.expected_attempts
    assert final.attempt == attempts, f"{where}: task.attempt {final.attempt}, expected {attempts}"

    retries = [e for e in log if e.type == C.TASK_EVENT_TYPE_RETRY_SCHEDULED]
    assert len(retries) == attempts - 1, f"{where}: {len(retries)} RETRY_SCHEDULED events: {describe(log)}"
    for number, event in enumerate(retries, start=1):
        assert event.task.error.code == case.retry_code, (
            f"{where}: retry {number} carries {CODE_NAME(event.task.error.code)}, "
            f"expected {CODE_NAME(case.retry_code)}: {event.task.error.message!r}"
        )
        assert event.task.attempt == number, f"{where}: retry {number} reports attempt {event.task.attempt}"
        assert event.task.error.retryable, f"{where}: retry {number} says the error is not retryable"
        assert event.task.status == C.TASK_STATUS_QUEUED, (
            f"{where}: retry {number} is {STATUS_NAME(event.task.status)}"
        )
        assert event.task.HasField("next_attempt_time"), f"{where}: retry {number} has no next_attempt_time"
        delay = seconds(event.task.next_attempt_time) - seconds(event.time)
        assert delay > 0, f"{where}: retry {number} is scheduled {delay:.3f} s after its event"
        assert delay >= case.min_retry_delay, (
            f"{where}: retry {number} waits {delay:.3f} s, less than {case.min_retry_delay} s ({case.note})"
        )

    if case.status == COMPLETED:
        assert log[-1].type == C.TASK_EVENT_TYPE_COMPLETED
        assert final.progress == 100
        assert final.WhichOneof("result") == f"{case.route}_result", f"{where}: no result"
        url = final.image_result.image_url if case.route == "image" else final.tts_result.audio_url
        assert url, f"{where}: no media URL"
    else:
        assert log[-1].type == C.TASK_EVENT_TYPE_FAILED
        assert not final.error.retryable, f"{where}: the final error still says retryable"
        assert final.HasField("end_time")
        assert final.WhichOneof("result") is None
        assert final.error.message, f"{where}: the error has no message"
        if case.message:
            assert case.message in final.error.message, (
                f"{where}: message {final.error.message!r} does not contain {case.message!r}"
            )
        if case.provider_status:
            assert final.error.provider_status == case.provider_status, (
                f"{where}: provider_status {final.error.provider_status}"
            )
        if case.provider_code:
            assert final.error.provider_code == case.provider_code, (
                f"{where}: provider_code {final.error.provider_code!r}"
            )
    assert all(e.type in TERMINAL_EVENTS or e.task.status != COMPLETED for e in log)


@pytest.mark.parametrize("case", MAIN_CASES, ids=lambda c: c.id)
async def test_provider_outcome(case: Case, main_outcomes: dict[str, Outcome]) -> None:
    check(main_outcomes[case.id])


@pytest.mark.parametrize("case", RATE_CASES, ids=lambda c: c.id)
async def test_rate_limit_is_retried_after_retry_after(case: Case, rate_outcomes: dict[str, Outcome]) -> None:
    check(rate_outcomes[case.id])


def test_every_design_row_is_covered() -> None:
    """The table's rows, by the error code each one ends with or retries with."""
    codes = {c.code for c in MAIN_CASES + RATE_CASES} | {c.retry_code for c in MAIN_CASES + RATE_CASES}
    assert codes >= {AUTH, CONTENT, INVALID, QUOTA, RATE, UNAVAILABLE, TIMEOUT, BAD}
