"""Smoke test of `make bench`: the quick mode of one small shape (B1, 30 tasks, charai only) runs
the real stack and writes raw results with the expected figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_bench_quick_b1_writes_its_figures(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "bench", "run", "--shape", "B1", "--n", "30", "--quick", "--no-peers"]
    args += ["--out-dir", str(tmp_path), "--no-md"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert results["meta"]["machine"]["nproc"] >= 1
    assert results["meta"]["versions"]["nats-server"]
    b1 = results["shapes"]["B1"]
    charai = b1["systems"]["charai"]
    assert len(charai["runs"]) == 1
    assert charai["runs"][0]["tasks"] == 30
    for figure in ("started_at_client_ms_p50", "started_at_client_ms_p99", "first_progress_at_client_ms_p50"):
        value = charai["summary"][figure]["median"]
        assert math.isfinite(value) and 0 < value < 5000, (figure, value)
    assert {g["figure"] for g in b1["goals"]} >= {"submit -> started at client, p99"}


@pytest.mark.timeout(90)
def test_create_cost_measures_both_shapes_and_their_bound() -> None:
    """``python -m bench.create_cost``: CPU per task of CreateTask and BatchCreateTasks, measured."""
    args = [sys.executable, "-m", "bench.create_cost", "--seconds", "0.5", "--pairs", "1"]
    args += ["--concurrency", "8"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert [r["method"] for r in out["runs"]] == ["CreateTask", "BatchCreateTasks"]
    for run in out["runs"]:
        assert run["errors"] == 0 and run["tasks_per_s"] > 0, run
        assert all(run[f"{k}_us"] > 0 for k in ("gateway", "task_store", "loadgen")), run
    bound = out["bound"]
    # No store cost at all can only raise what the fixed costs allow.
    assert bound["ratio_if_creates_cost_the_store_nothing"] >= bound["ratio_at_measured_store_cost"] > 0
    assert "store_us_per_task_for_4x" in bound


@pytest.mark.timeout(120)
def test_store_inproc_counts_the_relays_record_per_task() -> None:
    """``python -m bench.store_inproc --pages N --relay`` (the WAL pages of each kind of commit,
    BENCHMARKS.md's figures): a publish commit per task between its create and its claim, which
    writes the outbox and the task row, and nothing of ``tasks_dispatched`` (migration 15)."""
    args = [sys.executable, "-m", "bench.store_inproc", "--pages", "20", "--relay"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = {line.split(":")[0]: line for line in done.stdout.splitlines() if "WAL pages per commit" in line}
    assert list(kinds) == ["create", "publish", "claim", "progress", "complete"], done.stdout
    publish = kinds["publish"]
    assert "outbox" in publish and "tasks " in publish and "tasks_dispatched" not in publish, publish
    assert "tasks_dispatched" in kinds["create"], kinds["create"]


@pytest.mark.timeout(120)
def test_store_inproc_lone_reports_each_commit_alone() -> None:
    """``python -m bench.store_inproc --reports R --lone`` (BENCHMARKS.md, twenty-eighth pass:
    what a report that arrives alone costs): one commit per report, CPU split user / system."""
    args = [sys.executable, "-m", "bench.store_inproc", "--reports", "2", "--lone"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if "progress reports, lone" in line)
    assert line.startswith("200 progress reports, lone: "), line
    assert " user and " in line and " system CPU-us per report, 200 commits" in line, line
    # --lone names what it needs instead of being ignored (--each would batch the reports).
    wrong = [sys.executable, "-m", "bench.store_inproc", "--reports", "2", "--each", "8", "--lone"]
    refused = subprocess.run(wrong, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "--lone goes with --reports R alone" in refused.stderr, refused.stderr


@pytest.mark.timeout(120)
def test_store_inproc_times_creates_beside_the_queue_statistics() -> None:
    """``python -m bench.store_inproc --stats-every MS --prefill R`` (BENCHMARKS.md, twenty-ninth
    pass: what a dashboard's GetQueueStats costs the writes): the creates' latency with the
    statistics read while they run, the reads counted and timed."""
    args = [sys.executable, "-m", "bench.store_inproc", "--n", "300", "--stats-every", "5", "--prefill", "4"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if "queue statistics read every" in line)
    assert line.startswith("300 creates one at a time, the queue statistics read every 5 ms ("), line
    reads = int(line.split("(")[1].split(" reads")[0])
    assert reads >= 1, line
    assert all(f" {figure} " in line for figure in ("p50", "p99", "p99.9", "max")), line


@pytest.mark.timeout(120)
def test_store_inproc_times_creates_beside_a_listed_page_of_a_long_queue() -> None:
    """``python -m bench.store_inproc --list-every MS --queued Q`` (BENCHMARKS.md, thirtieth pass:
    what a ListTasks page of queued tasks, with their queue positions, costs the writes)."""
    args = [sys.executable, "-m", "bench.store_inproc", "--n", "200", "--list-every", "5", "--queued", "150"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if "queued tasks listed every" in line)
    assert line.startswith(
        "200 creates one at a time, a page of 500 of 150 queued tasks listed every 5 ms ("
    ), line
    assert int(line.split("(")[1].split(" reads")[0]) >= 1, line
    assert all(f" {figure} " in line for figure in ("p50", "p99", "p99.9", "max")), line


@pytest.mark.timeout(120)
def test_store_inproc_times_creates_of_a_tenant_with_a_budget() -> None:
    """``python -m bench.store_inproc --budget-records R`` (BENCHMARKS.md, twenty-ninth pass: what
    a budget check costs a create): creates of a budgeted tenant with R usage records this month,
    and of a tenant without budgets."""
    args = [sys.executable, "-m", "bench.store_inproc", "--n", "50", "--budget-records", "1000"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "usage records this month" in line]
    assert [line.split(" of tenant ")[1].split(":")[0] for line in lines] == ["budgeted", "default"], lines
    for line in lines:
        assert line.startswith("1000 usage records this month, 50 creates") and " p99 " in line, line
    # One mode at a time: another one given beside it is refused, not ignored.
    both = [*args, "--stats-every", "5"]
    refused = subprocess.run(both, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "one of --pages, --reports" in refused.stderr, refused.stderr
    assert "(given: --stats-every, --budget-records)" in refused.stderr, refused.stderr


@pytest.mark.timeout(120)
def test_grpc_transport_times_idle_round_trips_beside_bare_tcp() -> None:
    """``python -m bench.grpc_transport --idle-ms G`` (BENCHMARKS.md, twenty-eighth pass: what a
    hop costs at low load): each one-at-a-time figure with its round trip, and the bare TCP echo
    of the same server process, for both of gRPC's transport settings."""
    args = [sys.executable, "-m", "bench.grpc_transport", "--rounds", "1", "--n", "100", "--idle-ms", "1"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round 1, ")]
    assert len(rounds) == 2, done.stdout
    for line in rounds:
        figures = line.split(": ", 1)[1].split(" | ")
        names = [figure.split(":")[0] for figure in figures]
        assert names == [
            "unary, one at a time",
            "unary, 100 in flight",
            "bidi messages, one at a time",
            "bare TCP echo, one at a time",
        ], line
        trips = [float(f.rsplit("round trip p50 ", 1)[1].split()[0]) for f in figures if "round trip" in f]
        assert len(trips) == 3 and all(trip > 0 for trip in trips), line
