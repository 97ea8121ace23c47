"""The lifecycle core (charai.core.domain.lifecycle) on its own: no event loop, no database.

First every (status, command) pair against a table written out by hand, then the rules in
detail, then a hypothesis state machine that drives one task with random commands, times and
attempts and checks the invariants after every step.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from charai.core.domain import lifecycle as lc
from charai.core.domain import states
from charai.core.domain.errors import ErrorKind
from charai.core.domain.lifecycle import (
    ClaimOutcome,
    Decision,
    FailOutcome,
    Failure,
    Policy,
    Rejection,
    RejectReason,
    TaskState,
)
from charai.core.domain.retry import RetryPolicy
from charai.core.domain.states import EventType, Stage, Status
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

S = 1_000_000  # one second in microseconds
NOW = 1_800_000_000 * S
POLICY = Policy(
    max_attempts=3,
    lease_seconds=30.0,
    retry=RetryPolicy(base=1.0, cap=60.0, max_attempts=3),
    rng=random.Random(7),
)
Q, R, C, F, X = Status.QUEUED, Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED
LOST = Failure(ErrorKind.PROVIDER_UNAVAILABLE, "503 from the provider")


def task(status: Status, **changes: Any) -> TaskState:
    """A task in ``status`` as the pipeline leaves it there (attempt 1 for anything claimed)."""
    base: dict[Status, dict[str, Any]] = {
        Q: {},
        R: {
            "attempt": 1,
            "progress": 10,
            "stage": Stage.STARTING,
            "start_time": NOW - S,
            "lease_expires": NOW + S,
        },
        C: {"attempt": 1, "progress": 100, "stage": Stage.COMPLETED, "start_time": NOW - S, "end_time": NOW},
        F: {"attempt": 1, "stage": Stage.FAILED, "start_time": NOW - S, "end_time": NOW, "error": LOST},
        X: {"stage": Stage.CANCELLED, "end_time": NOW},
    }
    return TaskState(status=status, max_attempts=3, **{**base[status], **changes})


#: Identical requests found for a claim (reuse): one completed, one running for 4 s.
DONE_TWIN = lc.Twin(C, start_time=NOW - 9 * S)
RUNNING_TWIN = lc.Twin(R, start_time=NOW - 4 * S)

COMMANDS: dict[str, lc.Command] = {
    "claim": lc.Claim("w1"),
    "claim_done_twin": lc.Claim("w1", twin=DONE_TWIN),
    "claim_running_twin": lc.Claim("w1", twin=RUNNING_TWIN),
    "report": lc.Report(attempt=1, progress=50, stage="generating"),
    "complete": lc.Complete(attempt=1),
    "fail": lc.Fail(attempt=1, error=LOST),
    "cancel": lc.Cancel(),
    "rerun": lc.Rerun(),
    "redispatch": lc.Redispatch(seen_gen=1),
    "delete": lc.Delete(),
}


def summary(decision: Decision[object]) -> tuple[str, tuple[str, ...], int | None]:
    """(answer, event types, dispatched generation) in words, for the table."""
    answer = decision.answer
    if isinstance(answer, Rejection):
        said = answer.reason.name
    elif isinstance(answer, (lc.ClaimAnswer, lc.FailAnswer)):
        said = answer.outcome.name
    elif isinstance(answer, Status):
        said = answer.name
    else:
        said = repr(answer)
    return said, tuple(e.type.name for e in decision.events), decision.dispatch


#: Every (status, command) pair, written out by hand from DESIGN.md section 4 (a running task's
#: lease is live, the command names attempt 1 and dispatch generation 1).
EXPECTED: dict[tuple[Status, str], tuple[str, tuple[str, ...], int | None]] = {
    (Q, "claim"): ("RUN", ("STARTED",), None),
    (R, "claim"): ("DEFER", (), None),  # another attempt holds a live lease
    (C, "claim"): ("DONE", (), None),
    (F, "claim"): ("DONE", (), None),
    (X, "claim"): ("DONE", (), None),
    # An identical request completed: its result is reused, the task completes in the claim.
    (Q, "claim_done_twin"): ("REUSED", ("STARTED", "COMPLETED"), None),
    (R, "claim_done_twin"): ("DEFER", (), None),  # only a claim that would start an attempt
    (C, "claim_done_twin"): ("DONE", (), None),
    (F, "claim_done_twin"): ("DONE", (), None),
    (X, "claim_done_twin"): ("DONE", (), None),
    # An identical request is running: wait for it (then reuse, or run if it failed).
    (Q, "claim_running_twin"): ("DEFER", (), None),
    (R, "claim_running_twin"): ("DEFER", (), None),
    (C, "claim_running_twin"): ("DONE", (), None),
    (F, "claim_running_twin"): ("DONE", (), None),
    (X, "claim_running_twin"): ("DONE", (), None),
    (Q, "report"): ("STALE_ATTEMPT", (), None),  # a queued task has no running attempt
    (R, "report"): ("RUNNING", ("PROGRESS",), None),
    (C, "report"): ("TASK_ENDED", (), None),
    (F, "report"): ("TASK_ENDED", (), None),
    (X, "report"): ("TASK_ENDED", (), None),
    (Q, "complete"): ("STALE_ATTEMPT", (), None),
    (R, "complete"): ("None", ("COMPLETED",), None),
    (C, "complete"): ("None", (), None),  # the same attempt again: answered, nothing changes
    (F, "complete"): ("TASK_ENDED", (), None),
    (X, "complete"): ("TASK_ENDED", (), None),
    (Q, "fail"): ("IGNORED", (), None),
    (R, "fail"): ("RETRY", ("RETRY_SCHEDULED",), None),
    (C, "fail"): ("IGNORED", (), None),
    (F, "fail"): ("IGNORED", (), None),
    (X, "fail"): ("IGNORED", (), None),
    (Q, "cancel"): ("False", ("CANCELLED",), None),
    (R, "cancel"): ("True", ("CANCELLED",), None),  # True: the worker must be told to abort
    (C, "cancel"): ("False", (), None),
    (F, "cancel"): ("False", (), None),
    (X, "cancel"): ("False", (), None),
    (Q, "rerun"): ("NOT_FAILED", (), None),
    (R, "rerun"): ("NOT_FAILED", (), None),
    (C, "rerun"): ("NOT_FAILED", (), None),
    (F, "rerun"): ("None", ("QUEUED",), 2),
    (X, "rerun"): ("NOT_FAILED", (), None),
    (Q, "redispatch"): ("True", (), 2),
    (R, "redispatch"): ("True", (), 2),
    (C, "redispatch"): ("False", (), None),
    (F, "redispatch"): ("False", (), None),
    (X, "redispatch"): ("False", (), None),
    (Q, "delete"): ("NOT_FINISHED", (), None),  # cancel it first
    (R, "delete"): ("NOT_FINISHED", (), None),
    (C, "delete"): ("True", (), None),  # True: remove it, its events and its media
    (F, "delete"): ("True", (), None),
    (X, "delete"): ("True", (), None),
}

#: The (status, command) pairs in order (named: parametrize's object-typed argument hides the key's type).
CASES: list[tuple[Status, str]] = sorted(EXPECTED, key=lambda k: (k[0], k[1]))


@pytest.mark.parametrize(("status", "command"), CASES)
def test_every_status_and_command(status: Status, command: str) -> None:
    before = task(status)
    decision = lc.decide(before, COMMANDS[command], NOW, POLICY)
    assert summary(decision) == EXPECTED[(status, command)]
    if decision.rejected or (not decision.events and decision.dispatch is None):
        assert decision.state == before  # a refusal or a no-op changes nothing
    previous = before.status
    for event in decision.events:  # every step is a legal transition
        assert any(
            states.can_apply(previous, t)
            and t.event is event.type
            and states.apply(previous, t) is event.state.status
            for t in states.Transition
        ), (previous, event)
        previous = event.state.status
    assert decision.state.status is previous


def test_the_table_covers_every_pair() -> None:
    assert set(EXPECTED) == {(s, c) for s in Status for c in COMMANDS}


# -- claim ------------------------------------------------------------------------------------
def test_claim_starts_the_next_attempt_under_a_lease() -> None:
    decision = lc.claim(task(Q), lc.Claim("w1"), NOW, POLICY)
    assert decision.answer == lc.ClaimAnswer(ClaimOutcome.RUN, attempt=1)
    s = decision.state
    assert (s.status, s.attempt, s.progress, s.stage) == (R, 1, 10, Stage.STARTING)
    assert (s.start_time, s.lease_expires, s.lease_owner, s.next_attempt_time) == (
        NOW,
        NOW + 30 * S,
        "w1",
        None,
    )


def test_claim_defers_until_the_retry_is_due_then_runs_keeping_the_first_start_time() -> None:
    waiting = task(Q, attempt=1, start_time=NOW - 9 * S, next_attempt_time=NOW + 2 * S, error=LOST)
    early = lc.claim(waiting, lc.Claim(), NOW, POLICY)
    assert early.answer == lc.ClaimAnswer(ClaimOutcome.DEFER, retry_after=2.0)
    assert early.state == waiting
    due = lc.claim(waiting, lc.Claim(), NOW + 2 * S, POLICY)
    assert due.answer == lc.ClaimAnswer(ClaimOutcome.RUN, attempt=2)
    assert due.state.start_time == NOW - 9 * S
    assert due.state.error == LOST  # the last attempt's error stays visible while retrying


def test_claim_fails_a_queued_task_without_attempts_left() -> None:
    decision = lc.claim(task(Q, attempt=3), lc.Claim(), NOW, POLICY)
    assert decision.answer == lc.ClaimAnswer(ClaimOutcome.DONE)
    assert [e.type for e in decision.events] == [EventType.FAILED]
    s = decision.state
    assert (s.status, s.stage, s.end_time) == (F, Stage.FAILED, NOW)
    assert s.error == Failure(ErrorKind.WORKER_LOST, "no attempts left", retryable=False)


def test_claim_defers_while_the_lease_lives_and_takes_over_once_it_expired() -> None:
    running = task(R, lease_expires=NOW + 5 * S)
    assert lc.claim(running, lc.Claim("w2"), NOW, POLICY).answer == lc.ClaimAnswer(
        ClaimOutcome.DEFER, retry_after=5.0
    )
    taken = lc.claim(running, lc.Claim("w2"), NOW + 5 * S + 1, POLICY)
    assert taken.answer == lc.ClaimAnswer(ClaimOutcome.RUN, attempt=2)
    assert [e.type for e in taken.events] == [EventType.STARTED]
    s = taken.state
    assert (s.status, s.attempt, s.lease_owner) == (R, 2, "w2")
    assert s.error == Failure(ErrorKind.WORKER_LOST, "the worker running attempt 1 was lost", retryable=True)


def test_the_holders_claim_asked_again_after_a_lost_answer_is_answered_again() -> None:
    # The first answer was lost: the same attempt, no event, nothing changed; the holder does
    # not wait for its own lease to expire.
    running = task(R, lease_expires=NOW + 5 * S, lease_owner="w1")
    again = lc.claim(running, lc.Claim("w1", again=True), NOW, POLICY)
    assert again.answer == lc.ClaimAnswer(ClaimOutcome.RUN, attempt=1)
    assert again.events == () and again.state == running
    # A plain redelivery to the holder (it may have run the attempt), another worker asking
    # "again", or a claim without an id: all wait for the lease, as before.
    for claim in (lc.Claim("w1"), lc.Claim("w2", again=True), lc.Claim(again=True)):
        answer = lc.claim(running, claim, NOW, POLICY).answer
        assert answer == lc.ClaimAnswer(ClaimOutcome.DEFER, retry_after=5.0), claim


def test_a_claim_with_a_completed_twin_starts_and_completes_at_once() -> None:
    waiting = task(Q, attempt=1, progress=30, start_time=NOW - 9 * S, error=LOST)
    decision = lc.claim(waiting, lc.Claim("w1", twin=DONE_TWIN), NOW, POLICY)
    assert decision.answer == lc.ClaimAnswer(ClaimOutcome.REUSED, attempt=2)
    started, completed = decision.events
    assert (started.type, started.state.status, started.state.progress) == (EventType.STARTED, R, 30)
    assert started.state.lease_owner == "w1"
    s = completed.state
    assert (completed.type, s.status, s.progress, s.stage) == (EventType.COMPLETED, C, 100, Stage.COMPLETED)
    assert (s.attempt, s.error, s.lease_expires, s.end_time) == (2, None, None, NOW)
    assert s.start_time == NOW - 9 * S and decision.state == s


def test_a_claim_with_a_running_twin_waits_longer_the_longer_it_has_run() -> None:
    def wait(running_for: float) -> float:
        twin = lc.Twin(R, start_time=NOW - int(running_for * S))
        decision = lc.claim(task(Q), lc.Claim("w1", twin=twin), NOW, POLICY)
        assert decision.events == () and decision.state == task(Q)
        answer = decision.answer
        assert isinstance(answer, lc.ClaimAnswer) and answer.outcome is ClaimOutcome.DEFER
        return answer.retry_after

    assert wait(0) == lc.TWIN_WAIT_MIN
    assert wait(4) == 2.0
    assert wait(600) == lc.TWIN_WAIT_MAX
    # A twin without a start time (never seen started) is waited for the shortest time.
    no_start = lc.claim(task(Q), lc.Claim(twin=lc.Twin(R)), NOW, POLICY).answer
    assert no_start == lc.ClaimAnswer(ClaimOutcome.DEFER, retry_after=lc.TWIN_WAIT_MIN)


def test_a_twin_that_failed_queued_or_was_cancelled_changes_nothing() -> None:
    plain = lc.claim(task(Q), lc.Claim("w1"), NOW, POLICY)
    for status in (Q, F, X):
        assert lc.claim(task(Q), lc.Claim("w1", twin=lc.Twin(status, NOW - S)), NOW, POLICY) == plain


def test_a_twin_matters_only_to_a_claim_that_starts_an_attempt() -> None:
    # The holder asking again gets its attempt back; a live lease, a retry not due and an ended
    # task are answered as without a twin.
    running = task(R, lease_expires=NOW + 5 * S, lease_owner="w1")
    for twin in (DONE_TWIN, RUNNING_TWIN):
        again = lc.claim(running, lc.Claim("w1", again=True, twin=twin), NOW, POLICY)
        assert again.answer == lc.ClaimAnswer(ClaimOutcome.RUN, attempt=1) and again.events == ()
        held = lc.claim(running, lc.Claim("w2", twin=twin), NOW, POLICY)
        assert held.answer == lc.ClaimAnswer(ClaimOutcome.DEFER, retry_after=5.0)
        due_later = task(Q, attempt=1, next_attempt_time=NOW + 2 * S, error=LOST)
        early = lc.claim(due_later, lc.Claim(twin=twin), NOW, POLICY)
        assert early.answer == lc.ClaimAnswer(ClaimOutcome.DEFER, retry_after=2.0)


def test_a_lost_workers_task_is_taken_over_by_reuse_when_its_twin_completed() -> None:
    expired = task(R, lease_expires=NOW - 1, lease_owner="w1")
    decision = lc.claim(expired, lc.Claim("w2", twin=DONE_TWIN), NOW, POLICY)
    assert decision.answer == lc.ClaimAnswer(ClaimOutcome.REUSED, attempt=2)
    assert [e.type for e in decision.events] == [EventType.STARTED, EventType.COMPLETED]
    assert (decision.state.status, decision.state.error) == (C, None)


def test_a_lost_worker_on_the_last_allowed_attempt_fails_the_task() -> None:
    # WORKER_LOST allows 2 retries: the third lost attempt is final.
    running = task(R, attempt=3, lease_expires=NOW - 1)
    decision = lc.claim(running, lc.Claim(), NOW, POLICY)
    assert decision.answer == lc.ClaimAnswer(ClaimOutcome.DONE)
    assert decision.state.status is F
    assert decision.state.error is not None
    assert decision.state.error.message == "the worker running attempt 3 was lost and no attempts are left"


# -- report -----------------------------------------------------------------------------------
def test_report_records_news_and_only_renews_the_lease_otherwise() -> None:
    running = task(R, progress=40, stage="generating")
    moved = lc.report(running, lc.Report(1, 60, "generating"), NOW, POLICY)
    assert [e.type for e in moved.events] == [EventType.PROGRESS]
    assert (moved.state.progress, moved.state.lease_expires) == (60, NOW + 30 * S)
    same = lc.report(running, lc.Report(1, 30, ""), NOW + S, POLICY)  # backwards: clamped to 40
    assert same.events == ()
    assert same.state == dataclasses.replace(running, lease_expires=NOW + 31 * S)


def test_report_bounds_progress_and_cuts_long_stages() -> None:
    decision = lc.report(task(R), lc.Report(1, 100, "x" * 50), NOW, POLICY)
    assert (decision.state.progress, decision.state.stage) == (90, "x" * 32)


@pytest.mark.parametrize(
    ("attempt", "status", "reason"), [(2, R, RejectReason.STALE_ATTEMPT), (1, C, RejectReason.TASK_ENDED)]
)
def test_report_is_fenced(attempt: int, status: Status, reason: RejectReason) -> None:
    decision = lc.report(task(status), lc.Report(attempt, 50), NOW, POLICY)
    assert decision.answer == Rejection(reason, status, 1)


# -- complete ---------------------------------------------------------------------------------
def test_complete_records_the_unreported_progress_first() -> None:
    decision = lc.complete(task(R, progress=40), lc.Complete(1, 90, "processing"), NOW)
    assert [(e.type, e.state.progress, e.state.stage) for e in decision.events] == [
        (EventType.PROGRESS, 90, "processing"),
        (EventType.COMPLETED, 100, Stage.COMPLETED),
    ]
    assert (decision.state.end_time, decision.state.error, decision.state.lease_expires) == (NOW, None, None)
    again = lc.complete(decision.state, lc.Complete(1), NOW + S)
    assert (again.events, again.answer, again.state) == ((), None, decision.state)
    other = lc.complete(decision.state, lc.Complete(2), NOW + S)
    assert other.answer == Rejection(RejectReason.TASK_ENDED, C, 1)


def test_complete_without_news_is_one_event() -> None:
    decision = lc.complete(task(R, progress=90, stage="processing"), lc.Complete(1, 90, "processing"), NOW)
    assert [e.type for e in decision.events] == [EventType.COMPLETED]


# -- fail -------------------------------------------------------------------------------------
def test_a_retryable_failure_schedules_the_next_attempt() -> None:
    decision = lc.fail(task(R, progress=60), lc.Fail(1, LOST), NOW, POLICY)
    answer = decision.answer
    assert isinstance(answer, lc.FailAnswer)
    assert answer.outcome is FailOutcome.RETRY
    assert 0.5 <= answer.delay <= 1.0  # equal jitter of the first step (base 1 s)
    s = decision.state
    assert (s.status, s.progress, s.stage, s.lease_expires) == (
        Q,
        60,
        Stage.WAITING_RETRY,
        None,
    )  # never back
    assert s.next_attempt_time == NOW + int(answer.delay * S)
    assert s.error == dataclasses.replace(LOST, retryable=True)


def test_retry_after_is_a_floor_for_the_delay() -> None:
    answer = lc.fail(task(R), lc.Fail(1, LOST, retry_after=20.0), NOW, POLICY).answer
    assert isinstance(answer, lc.FailAnswer)
    assert 20.0 <= answer.delay <= 30.0


@pytest.mark.parametrize(
    "kind", [ErrorKind.PROVIDER_AUTH, ErrorKind.CONTENT_REJECTED, ErrorKind.QUOTA_EXHAUSTED]
)
def test_a_permanent_failure_is_final_at_once(kind: ErrorKind) -> None:
    decision = lc.fail(task(R), lc.Fail(1, Failure(kind, "no", retryable=True)), NOW, POLICY)
    assert decision.answer == lc.FailAnswer(FailOutcome.FAILED)
    assert decision.state.error == Failure(kind, "no", retryable=False)
    assert (decision.state.status, decision.state.end_time) == (F, NOW)


def test_the_attempt_budget_ends_retries() -> None:
    # PROVIDER_UNAVAILABLE allows 3 retries, but the policy allows 3 attempts in all.
    decision = lc.fail(task(R, attempt=3), lc.Fail(3, LOST), NOW, POLICY)
    assert decision.answer == lc.FailAnswer(FailOutcome.FAILED)


def test_a_re_run_gets_the_whole_budget_again() -> None:
    failed = task(F, attempt=3)
    rerun = lc.rerun(failed, lc.Rerun(), NOW, POLICY).state
    assert rerun.max_attempts == 6
    started = lc.claim(rerun, lc.Claim(), NOW, POLICY).state
    assert started.attempt == 4
    assert POLICY.run_attempt(started) == 1
    assert lc.fail(started, lc.Fail(4, LOST), NOW, POLICY).answer.outcome is FailOutcome.RETRY  # type: ignore[union-attr]


# -- cancel, re-run, re-dispatch -------------------------------------------------------------
def test_cancel_of_a_task_waiting_for_its_retry_clears_the_retry_time() -> None:
    waiting = task(Q, attempt=1, next_attempt_time=NOW + 5 * S)
    decision = lc.cancel(waiting, lc.Cancel(), NOW)
    s = decision.state
    assert (s.status, s.stage, s.end_time, s.next_attempt_time) == (X, Stage.CANCELLED, NOW, None)


def test_rerun_queues_a_failed_task_again_with_a_new_job() -> None:
    failed = task(F, attempt=2, dispatch_gen=4, lease_owner="w9", progress=70)
    decision = lc.rerun(failed, lc.Rerun(), NOW, POLICY)
    s = decision.state
    assert (s.status, s.stage, s.error, s.end_time, s.lease_owner) == (Q, Stage.QUEUED, None, None, None)
    assert (s.attempt, s.max_attempts, s.dispatch_gen, decision.dispatch) == (2, 5, 5, 5)
    assert s.start_time == failed.start_time  # its history stays readable
    assert s.progress == 70  # a re-run does not move the bar back either
    assert lc.claim(s, lc.Claim(), NOW, POLICY).state.progress == 70


def test_redispatch_is_conditional_on_the_generation_seen() -> None:
    queued = task(Q, dispatch_gen=3)
    assert lc.redispatch(queued, lc.Redispatch(2), NOW).answer is False
    decision = lc.redispatch(queued, lc.Redispatch(3), NOW)
    assert (decision.answer, decision.dispatch, decision.state.dispatch_gen, decision.events) == (
        True,
        4,
        4,
        (),
    )


def test_create_is_queued_with_its_first_job() -> None:
    decision = lc.create(POLICY, NOW)
    assert decision.state == TaskState(status=Q, max_attempts=3)
    assert [e.type for e in decision.events] == [EventType.QUEUED]
    assert decision.dispatch == 1


# -- random lives of one task ------------------------------------------------------------------
kinds = st.sampled_from(list(ErrorKind))


class OneTask(RuleBasedStateMachine):
    """Random commands against one task; invariants after each step."""

    @initialize(max_attempts=st.integers(1, 6))
    def start(self, max_attempts: int) -> None:
        self.policy = Policy(max_attempts=max_attempts, lease_seconds=10.0, rng=random.Random(0))
        self.now = NOW
        created = lc.create(self.policy, self.now)
        self.state = created.state
        self.terminal_events = 0
        self.issued: list[int] = [0]

    def run(self, command: lc.Command) -> Decision[object]:
        before = self.state
        decision = lc.decide(before, command, self.now, self.policy)
        previous = before.status
        for event in decision.events:
            legal = [t for t in states.Transition if t.event is event.type and states.can_apply(previous, t)]
            assert legal, (previous, event.type)
            assert states.apply(previous, legal[0]) is event.state.status
            previous = event.state.status
            if previous.terminal:
                self.terminal_events += 1
            if event.type is EventType.QUEUED:  # a re-run starts a new run
                self.terminal_events = 0
        after = decision.state
        progress = before.progress
        for event in decision.events:
            assert event.state.progress >= progress, (before, event)  # never backwards, in any event
            progress = event.state.progress
        assert after.progress >= before.progress
        if decision.rejected:
            assert after == before
        if not decision.events:  # no event: only the lease or the dispatch generation may move
            assert (
                dataclasses.replace(
                    after, lease_expires=before.lease_expires, dispatch_gen=before.dispatch_gen
                )
                == before
            )
        assert after.attempt >= before.attempt
        assert after.dispatch_gen >= before.dispatch_gen
        if before.status in (C, X):
            assert after == before  # completed and cancelled are final for good
        self.state = after
        return decision

    @rule(seconds=st.integers(0, 40))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds * S

    @rule(
        worker=st.sampled_from(["w1", "w2"]),
        again=st.booleans(),
        twin=st.none() | st.sampled_from(list(Status)),
        twin_age=st.integers(0, 60),
    )
    def claim(self, worker: str, again: bool, twin: Status | None, twin_age: int) -> None:
        before = self.state
        seen = None if twin is None else lc.Twin(twin, start_time=self.now - twin_age * S)
        decision = self.run(lc.Claim(worker, again, seen))
        answer = decision.answer
        assert isinstance(answer, lc.ClaimAnswer)
        if answer.outcome is ClaimOutcome.RUN:
            assert answer.attempt == self.state.attempt
            if not decision.events:  # answered again: only its holder, asking again, in time
                assert again and before.lease_owner == worker and before.status is R
            else:  # a new attempt runs only when no twin is done or running
                assert twin not in (C, R)
            self.issued.append(answer.attempt)
        if answer.outcome is ClaimOutcome.REUSED:  # a completed twin: done in the claim
            assert twin is C and answer.attempt == self.state.attempt == before.attempt + 1
            assert [e.type for e in decision.events] == [EventType.STARTED, EventType.COMPLETED]
            assert self.state.status is C
            self.issued.append(answer.attempt)
        elif answer.outcome is ClaimOutcome.DEFER:
            assert decision.events == () and answer.retry_after >= 0
            due = before.next_attempt_time is None or before.next_attempt_time <= self.now
            if twin is R and before.status is Q and due:  # waits for the twin, within bounds
                assert lc.TWIN_WAIT_MIN <= answer.retry_after <= lc.TWIN_WAIT_MAX

    @rule(pick=st.integers(0, 10), progress=st.integers(-50, 150), stage=st.sampled_from(["", "generating"]))
    def report(self, pick: int, progress: int, stage: str) -> None:
        attempt = self.issued[pick % len(self.issued)]
        before = self.state
        decision = self.run(lc.Report(attempt, progress, stage))
        if attempt != before.attempt or before.status is not R:
            assert decision.rejected  # fencing: only the attempt holding the task reports

    @rule(pick=st.integers(0, 10), progress=st.integers(0, 95))
    def complete(self, pick: int, progress: int) -> None:
        self.run(lc.Complete(self.issued[pick % len(self.issued)], progress, "processing"))

    @rule(pick=st.integers(0, 10), kind=kinds, retry_after=st.none() | st.floats(0, 120))
    def fail(self, pick: int, kind: ErrorKind, retry_after: float | None) -> None:
        self.run(lc.Fail(self.issued[pick % len(self.issued)], Failure(kind, "x"), retry_after))

    @rule()
    def cancel(self) -> None:
        self.run(lc.Cancel())

    @rule()
    def rerun(self) -> None:
        self.run(lc.Rerun())

    @rule(back=st.integers(0, 2))
    def redispatch(self, back: int) -> None:
        self.run(lc.Redispatch(self.state.dispatch_gen - back))

    @invariant()
    def consistent(self) -> None:
        s = self.state
        assert 0 <= s.attempt <= s.max_attempts
        assert 0 <= s.progress <= 100
        assert self.terminal_events <= 1  # one terminal state per run
        if s.status is R:
            assert s.lease_expires is not None
            assert 10 <= s.progress <= 90
            assert s.start_time is not None
        else:
            assert s.lease_expires is None
        if s.status.terminal:
            assert s.end_time is not None
            assert s.next_attempt_time is None
        if s.status is C:
            assert (s.progress, s.error) == (100, None)
        if s.status is F:
            assert s.error is not None
            assert not s.error.retryable
        if s.next_attempt_time is not None:
            assert s.status is Q
            assert s.stage == Stage.WAITING_RETRY


TestOneTask = OneTask.TestCase
TestOneTask.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)
