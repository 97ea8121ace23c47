"""BENCHMARKS.md from the raw results of one run (bench/results/<timestamp>.json)."""

from __future__ import annotations

import math
from typing import Any

# Per shape: (row label, metric, systems in column order). Every system measured in the run.
HEADLINES: dict[str, list[tuple[str, str, list[str]]]] = {
    "B1": [
        (
            "pickup p50, ms",
            "started_at_client_ms_p50|start_ms_p50|pub_to_receipt_ms_p50",
            ["charai", "bullmq-durable", "bullmq", "celery", "floor-jetstream"],
        ),
        (
            "pickup p99, ms",
            "started_at_client_ms_p99|start_ms_p99|pub_to_receipt_ms_p99",
            ["charai", "bullmq-durable", "bullmq", "celery", "floor-jetstream"],
        ),
        # Where charai's pickup goes (p50 of each leg, wall clocks of one machine).
        ("leg 1: client -> the create's transaction, ms p50", "client_to_create_tx_ms_p50", ["charai"]),
        (
            "leg 2: -> the claim (pushed: the same transaction; else relay, JetStream, worker), ms p50",
            "create_tx_to_claim_tx_ms_p50",
            ["charai"],
        ),
        (
            "leg 3: -> started at the client (commit, bus, gateway), ms p50",
            "claim_tx_to_client_ms_p50",
            ["charai"],
        ),
    ],
    "B2": [
        (
            "e2e tasks/s",
            "tasks_per_s|fetch_ack_per_s",
            [
                "charai-noop",
                "charai",
                "bullmq-durable-c1",
                "bullmq-c1",
                "bullmq-durable-c50",
                "celery",
                "floor-jetstream",
            ],
        ),
        ("drain tasks/s", "tasks_per_s", ["charai-drain", "bullmq-durable-c1-drain"]),
        ("CPU-ms per task (all processes)", "cpu_ms_per_task", ["charai-noop", "charai"]),
    ],
    "B3": [
        (
            "efficiency, 100 in flight",
            "efficiency",
            ["charai-c100", "bullmq-durable-c100", "celery-gevent-c100", "floor-asyncio-c100"],
        ),
        (
            "efficiency, 1,000 in flight",
            "efficiency",
            ["charai-c1000", "bullmq-durable-c1000", "celery-gevent-c1000", "floor-asyncio-c1000"],
        ),
        (
            "KB RSS per job in flight (1,000)",
            "kb_per_in_flight",
            ["charai-c1000", "bullmq-durable-c1000", "celery-gevent-c1000", "floor-asyncio-c1000"],
        ),
    ],
    "B4": [
        ("RPS at 100 in flight", "rps", ["charai", "floor-grpc"]),
        ("p99, ms", "p99_ms", ["charai", "floor-grpc"]),
        ("B4b: tasks/s via BatchCreateTasks(4)", "tasks_per_s", ["charai-batch4"]),
    ],
    "B5": [
        (
            "report -> client lag p99, ms",
            "lag_ms_p99",
            ["charai", "floor-grpc-fanout", "bullmq-durable-progress"],
        ),
        ("lag p99 at 300 streams (100 with --quick), ms", "lag_ms_p99", ["charai-300"]),
        (
            "time waiting for a core (gateway, task_store, load generator), ms per s",
            "runqueue_wait_ms_per_s",
            ["charai", "charai-300"],
        ),
        ("deliveries lost", "lost", ["charai", "floor-grpc-fanout"]),
        ("gateway KB RSS per stream", "gateway_rss_kb_per_stream", ["charai"]),
    ],
    "B6": [
        ("makespan / ideal", "makespan_vs_ideal", ["charai"]),
        ("429s, % of calls", "pct_429", ["charai"]),
        ("queue wait p99, s", "queue_wait_s_p99", ["charai"]),
    ],
    "B8": [
        ("max calls in flight, both workers", "max_in_flight", ["charai"]),
        ("learned limit (max)", "learned_limit_max", ["charai"]),
        ("429s, % of calls", "pct_429", ["charai"]),
        ("makespan / ideal", "makespan_vs_ideal", ["charai"]),
    ],
    "F1": [
        ("B's first start after, s", "b_first_wait_s", ["charai"]),
        ("B's first start, provider calls", "b_first_wait_calls", ["charai"]),
        ("A's tasks started in between", "a_started_between", ["charai"]),
        ("A's calls before B's first call", "a_calls_before_b_call", ["charai"]),
        ("makespan / ideal", "makespan_vs_ideal", ["charai"]),
        ("releases/s, many tenants", "releases_per_s", ["charai-release"]),
        ("releases/s, a tenth of the tenants", "few_tenants_releases_per_s", ["charai-release"]),
    ],
    "E1": [
        ("|error| of estimated wait, median %", "abs_error_pct_median", ["charai"]),
        ("|error| p90 %", "abs_error_pct_p90", ["charai"]),
        ("within +-30 %, share", "within_30pct_share", ["charai"]),
    ],
    "W1": [
        ("deliveries/s", "deliveries_per_s", ["charai", "floor-aiohttp"]),
        ("event -> delivery p99, ms", "latency_ms_p99", ["charai", "floor-aiohttp"]),
    ],
    "B7": [
        ("lost", "lost", ["charai"]),
        ("redelivery max / ack-wait", "redelivery_vs_ack_wait", ["charai"]),
        ("duplicate provider calls", "duplicate_provider_calls", ["charai"]),
    ],
}


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cell(summary: dict[str, Any], metric: str) -> str:
    for m in metric.split("|"):
        if m in summary:
            s = summary[m]
            if s["min"] == s["max"]:
                return fmt(s["median"])
            return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"
    return "—"


def _core_speed(meta: dict[str, Any]) -> str:
    """The VM's speed during the run (``bench.common.core_speed``), for comparing runs."""
    speed = meta.get("core_speed_s") or {}
    if "start" not in speed:
        return ""
    end = f" and {speed['end']:.2f} s at its end" if "end" in speed else ""
    return (
        f" **Core speed:** one core ran `for i in range(10**7): s += i` (`bench.common.core_speed`, the"
        f" project's Python) in {speed['start']:.2f} s at the run's start{end} (best of 3; lower is"
        " faster). Compare runs by it: cloud VMs of one size differ, and the CPU-bound shapes (B3 at"
        " 1,000 in flight, B4, B5) move with it."
    )


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench {meta['argv']}`) on {meta['started']};"
        f" the whole run took {meta['seconds'] / 60:.1f} min."
        f" Raw results: `bench/results/{meta['file']}` (not committed). Code: {meta.get('commit', '?')}.",
        "",
        f"**Machine:** {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, {m['os']},"
        f" Linux {m['kernel']}. Everything runs on this one machine over loopback: load generator, broker,"
        " store, workers and provider emulator share the cores (no pinning is possible with 2 cores)."
        + _core_speed(meta),
        "",
        "**Versions:** " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "",
        "**Method.** Every system in a shape is measured in this same run, one after another, never at the"
        f" same time. Each figure is the median (min–max) of {meta['options']['runs']} runs after one"
        " discarded warm-up run (warm: processes, connections and caches are up; the stacks and peers are"
        " started once per shape). charai runs as real processes (devstack: nats-server, task_store on"
        " SQLite WAL with synchronous=FULL, gateway, workers, provider emulator). BullMQ keeps full job"
        " state; `durable` = Redis with `appendonly yes` + `appendfsync always` (what charai's SQLite FULL"
        " commit matches), the other row Redis without persistence. Celery has its Redis result backend on."
        " Floors are the bare building blocks (nats-py on JetStream, grpc.aio, asyncio + aiohttp) against"
        " the same binaries and emulator."
        + (
            f" gRPC runs with `GRPC_EXPERIMENTS={meta['grpc_experiments']}` in charai's services, the"
            ' bench client and the gRPC floors alike (README, "gRPC\'s transport").'
            if meta.get("grpc_experiments")
            else ""
        ),
        "",
    ]
    if meta.get("quick"):
        lines += ["**Quick mode:** smoke sizes, not comparable figures.", ""]
    lines += [
        "## Goals",
        "",
        "| Shape | Figure | charai | Goal | ours / goal | Met |",
        "|---|---|---|---|---|---|",
    ]
    for name, shape in results["shapes"].items():
        for g in shape.get("goals", []):
            met = "—" if g["met"] is None else ("**yes**" if g["met"] else "**no**")
            target = (
                f"{fmt(g['target'])} {g['unit']}".strip() if g["target"] is not None else "— (peer missing)"
            )
            lines.append(
                f"| {name} | {g['figure']} | {fmt(g['ours'])} {g['unit']} | {target} ({g['ref']}) |"
                f" {fmt(g['ratio'])} | {met} |"
            )
    lines += ["", "## Headline figures (same run)", ""]
    for name, shape in results["shapes"].items():
        heads = HEADLINES.get(name, [])
        systems = shape["systems"]
        lines += [f"### {name}: {shape['title']}", ""]
        params = ", ".join(f"{k}={v}" for k, v in shape["params"].items())
        lines += [
            f"Parameters: {params}. Took {shape['seconds']:.0f} s; load average before/after"
            f" {shape['loadavg_before'][0]:.2f} / {shape['loadavg_after'][0]:.2f}.",
            "",
        ]
        for label, metric, order in heads:
            present = [s for s in order if s in systems]
            if not present:
                continue
            lines.append(f"| {label} | " + " | ".join(present) + " |")
            lines.append("|---|" + "---|" * len(present))
            lines.append("| | " + " | ".join(cell(systems[s]["summary"], metric) for s in present) + " |")
            lines.append("")
        lines += ["<details><summary>every metric</summary>", ""]
        for sname, sysd in systems.items():
            about = "; ".join(f"{v}" for v in sysd["about"].values())
            lines.append(
                f"- **{sname}** ({about}): "
                + ", ".join(f"{k} {cell(sysd['summary'], k)}" for k in sysd["summary"])
            )
        lines += ["", "</details>", ""]
    notes = results.get("notes")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)
