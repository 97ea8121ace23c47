"""When ``make run`` restarts a process that died, and when it gives up (the pure part of the
devstack supervisor: times are numbers, nothing runs)."""

from __future__ import annotations

from charai.devstack.supervisor import RestartPolicy, RestartTracker

POLICY = RestartPolicy(
    first_delay=0.5, max_delay=10.0, stable_after=30.0, max_start_crashes=5, start_crash_window=60.0
)


def test_backoff_doubles_to_its_cap_while_crashes_come_quickly() -> None:
    tracker = RestartTracker(POLICY)
    delays = []
    now = 0.0
    for _ in range(8):
        tracker.started()
        tracker.ready(now + 1)  # it came up each time, then died 5 s later
        now += 6
        verdict = tracker.crashed(now)
        assert not verdict.give_up
        delays.append(verdict.delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_a_process_that_stayed_up_starts_from_the_first_delay_again() -> None:
    tracker = RestartTracker(POLICY)
    tracker.ready(0.0)
    assert [tracker.crashed(t).delay for t in (1.0, 2.0, 3.0)] == [0.5, 1.0, 2.0]
    tracker.started()
    tracker.ready(10.0)
    assert tracker.crashed(10.0 + 29.0).delay == 4.0  # not up long enough
    tracker.started()
    tracker.ready(50.0)
    assert tracker.crashed(50.0 + 30.0).delay == 0.5  # up 30 s: a new incident


def test_five_crashes_in_a_row_before_ready_give_up() -> None:
    tracker = RestartTracker(POLICY)
    verdicts = []
    for now in (0.0, 1.0, 3.0, 6.0, 11.0):
        tracker.started()
        verdicts.append(tracker.crashed(now))
    assert [v.give_up for v in verdicts] == [False, False, False, False, True]
    assert [v.delay for v in verdicts[:4]] == [0.5, 1.0, 2.0, 4.0]
    assert verdicts[-1].start_crashes == 5


def test_becoming_ready_in_between_resets_the_count() -> None:
    tracker = RestartTracker(POLICY)
    for now in (0.0, 1.0, 2.0, 3.0):
        tracker.started()
        assert not tracker.crashed(now).give_up
    tracker.started()
    tracker.ready(4.0)
    assert not tracker.crashed(5.0).give_up  # it had served: a crash after ready, not at start
    for now in (6.0, 7.0, 8.0, 9.0):
        tracker.started()
        assert not tracker.crashed(now).give_up
    tracker.started()
    assert tracker.crashed(10.0).give_up


def test_start_crashes_spread_beyond_the_window_are_not_a_crash_loop() -> None:
    tracker = RestartTracker(POLICY)
    for now in (0.0, 20.0, 40.0, 61.0, 80.0, 100.0, 125.0):
        tracker.started()
        assert not tracker.crashed(now).give_up, now
