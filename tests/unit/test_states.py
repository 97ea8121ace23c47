"""Pure tests of the task state machine (charai.core.domain.states)."""

from __future__ import annotations

import pytest
from charai.core.domain import states
from charai.core.domain.states import (
    TERMINAL,
    IllegalTransitionError,
    Status,
    Transition,
    apply,
    can_apply,
    clamp_progress,
    fenced,
)
from charai.tasks.v1 import task_pb2
from hypothesis import given
from hypothesis import strategies as st

Q, R, C, F, X = Status.QUEUED, Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED

#: The lifecycle written out by hand (DESIGN.md section 4 and the module's comments), independent of
#: the module's own tables: (from, transition) -> to. Anything absent is illegal.
EXPECTED: dict[tuple[Status, Transition], Status] = {
    (Q, Transition.START): R,
    (R, Transition.START): R,  # another worker takes over an expired lease
    (R, Transition.PROGRESS): R,
    (R, Transition.RETRY): Q,
    (R, Transition.COMPLETE): C,
    (Q, Transition.FAIL): F,  # attempts exhausted on claim
    (R, Transition.FAIL): F,
    (Q, Transition.CANCEL): X,
    (R, Transition.CANCEL): X,
    (F, Transition.RERUN): Q,  # an operator re-runs a failed task (RetryTask)
}

ALL_PAIRS = [(s, t) for s in Status for t in Transition]


def test_terminal_set() -> None:
    assert frozenset({C, F, X}) == TERMINAL
    assert [s for s in Status if s.terminal] == [C, F, X]
    assert not Q.terminal
    assert not R.terminal


def test_status_values_match_proto_task_status() -> None:
    for status in Status:
        assert task_pb2.TaskStatus.Value(f"TASK_STATUS_{status.name}") == status.value
    assert {s.seed_name for s in Status} == {"queued", "running", "completed", "failed", "cancelled"}


def test_every_transition_names_a_proto_event_type() -> None:
    names = set(task_pb2.TaskEventType.keys())
    for transition in Transition:
        assert f"TASK_EVENT_TYPE_{transition.value.upper()}" in names, transition


@pytest.mark.parametrize(("status", "transition"), ALL_PAIRS, ids=lambda v: v.name)
def test_transition_table(status: Status, transition: Transition) -> None:
    expected = EXPECTED.get((status, transition))
    assert can_apply(status, transition) is (expected is not None)
    if expected is None:
        with pytest.raises(IllegalTransitionError) as info:
            apply(status, transition)
        assert info.value.status is status
        assert info.value.transition is transition
        assert status.seed_name in str(info.value)
        assert transition.value in str(info.value)
    else:
        assert apply(status, transition) is expected


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_statuses_are_final(status: Status) -> None:
    """Final for the pipeline; the one way out is an operator's re-run of a FAILED task."""
    for transition in Transition:
        if (status, transition) == (F, Transition.RERUN):
            assert apply(status, transition) is Q
            continue
        assert not can_apply(status, transition)
        with pytest.raises(IllegalTransitionError):
            apply(status, transition)


def test_every_transition_records_its_own_event_type() -> None:
    for transition in Transition:
        assert transition.event.name.lower() == transition.value
        number = task_pb2.TaskEventType.Value(f"TASK_EVENT_TYPE_{transition.event.name}")
        assert number == int(transition.event)  # int(): mypy deems proto ValueType, IntEnum disjoint


@given(st.lists(st.sampled_from(list(Transition)), max_size=40))
def test_random_sequences_never_leave_a_terminal_status(transitions: list[Transition]) -> None:
    status = Q
    terminals_reached: list[Status] = []
    for transition in transitions:
        legal = (status, transition) in EXPECTED
        assert can_apply(status, transition) is legal
        if legal:
            assert not status.terminal or transition is Transition.RERUN
            new = apply(status, transition)
            assert new is EXPECTED[(status, transition)]
            status = new
            if status.terminal:
                terminals_reached.append(status)
            if transition is Transition.RERUN:
                terminals_reached.clear()  # an operator's re-run starts a new run
        else:
            before = status
            with pytest.raises(IllegalTransitionError):
                apply(status, transition)
            assert status is before
    # A run reaches at most one terminal status, and once there it stays (but for a re-run).
    assert len(terminals_reached) <= 1
    if terminals_reached:
        assert status is terminals_reached[0]


@given(st.sampled_from(list(Status)), st.sampled_from(list(Transition)))
def test_apply_agrees_with_can_apply(status: Status, transition: Transition) -> None:
    if can_apply(status, transition):
        assert apply(status, transition) is EXPECTED[(status, transition)]
    else:
        with pytest.raises(IllegalTransitionError):
            apply(status, transition)


def test_progress_milestones_follow_the_seed() -> None:
    assert (
        states.PROGRESS_QUEUED,
        states.PROGRESS_STARTED,
        states.PROGRESS_CALL_START,
        states.PROGRESS_CALL_END,
        states.PROGRESS_PROCESSING,
        states.PROGRESS_DONE,
    ) == (0, 10, 20, 80, 90, 100)


@pytest.mark.parametrize(
    ("previous", "reported", "expected"),
    [
        (0, 0, 10),
        (10, 5, 10),
        (10, 50, 50),
        (50, 40, 50),  # never backwards
        (50, 95, 90),  # 100 is only for completion
        (10, -20, 10),
        (90, 100, 90),
    ],
)
def test_clamp_progress_examples(previous: int, reported: int, expected: int) -> None:
    assert clamp_progress(previous, reported) == expected


@given(st.integers(0, 90), st.lists(st.integers(-1000, 1000), max_size=30))
def test_clamp_progress_is_monotonic_and_bounded(start: int, reports: list[int]) -> None:
    progress = start
    for reported in reports:
        new = clamp_progress(progress, reported)
        assert new >= progress
        assert states.PROGRESS_STARTED <= new <= states.PROGRESS_PROCESSING
        progress = new


@given(st.integers(0, 100), st.integers(-1000, 1000), st.integers(-1000, 1000))
def test_clamp_progress_is_monotonic_in_reported(previous: int, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert clamp_progress(previous, low) <= clamp_progress(previous, high)


@given(st.integers(0, 50), st.integers(0, 50), st.sampled_from(list(Status)))
def test_fenced_only_current_attempt_of_a_running_task(current: int, reported: int, status: Status) -> None:
    assert fenced(current, reported, status) is (status is R and current == reported)


def test_fenced_examples() -> None:
    assert fenced(2, 2, R)
    assert not fenced(2, 1, R)  # stale worker whose lease was taken over
    assert not fenced(2, 3, R)
    assert not fenced(1, 1, Q)  # requeued: the old attempt may not report
    for status in TERMINAL:
        assert not fenced(1, 1, status)  # late duplicate after the end


def test_the_schemas_partial_index_conditions_name_these_statuses() -> None:
    """The stores' partial indexes (and the queries that read them) spell statuses as literals
    (``charai.task_store.schema``): they must be these statuses' values."""
    from charai.task_store import schema

    unfinished = sorted(int(s) for s in Status if not s.terminal)
    assert f"status IN ({', '.join(map(str, unfinished))})" == schema.UNFINISHED

    def in_range(condition: str) -> set[Status]:
        """The statuses a ``status BETWEEN lo AND hi`` condition holds for."""
        words = condition.split()
        assert words[:2] == ["status", "BETWEEN"] and words[3] == "AND" and len(words) == 5, condition
        return {s for s in Status if int(words[2]) <= int(s) <= int(words[4])}

    assert in_range(schema.ENDED) == set(TERMINAL)
    assert in_range(schema.REUSABLE) == {R, C}  # what a reuse lookup may find
