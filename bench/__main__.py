"""``python -m bench run [--shape B1,B2] [--runs 3] [--n N] [--quick] [--no-peers]``;
``python -m bench setup`` (installs the peers).


Writes bench/results/<timestamp>.json (raw) and BENCHMARKS.md (unless --no-md or --quick).
"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: the services' gRPC transport, for the floors too

# isort: split
import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from bench import peers, report, suite
from bench.common import BENCH_DIR, ROOT, commit, core_speed, log, machine, versions

ANALYSIS = BENCH_DIR / "analysis.md"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install redis-server, bullmq (npm) and Celery (bench/.venv-celery)")
    prof = sub.add_parser("profile", help="py-spy on the stack's Python services under one shape's load")
    prof.add_argument("--shape", choices=("B1", "B2", "B2noop", "B3", "B4", "B4b", "B5", "W1"), default="B2")
    prof.add_argument(
        "--n",
        type=int,
        default=None,
        help=(
            "tasks (B1, B2, B2noop; 3000); jobs in flight (B3; 1000); streams (B5; 1000);"
            " deliveries (W1; 3000)"
        ),
    )
    prof.add_argument("--seconds", type=float, default=15.0, help="B4, B4b: seconds of load")
    rep = sub.add_parser("report", help="write the report again from a raw results file")
    rep.add_argument("results", type=Path)
    rep.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    run = sub.add_parser("run", help="run shapes and write the results")
    run.add_argument(
        "--shape", default="B1,B2,B3,B4,B5,B6,B8,B7,W1,E1,F1", help="comma-separated, e.g. B1 or B2,B4"
    )
    run.add_argument(
        "--runs", type=int, default=None, help="measured runs per system (default 3; 1 with --quick)"
    )
    run.add_argument("--n", type=int, default=None, help="the shape's main size (tasks; streams for B5)")
    run.add_argument("--seconds", type=float, default=None, help="B4: seconds per run")
    run.add_argument("--latency", default=None, help="B3/B6: provider latency MIN:MAX seconds")
    run.add_argument("--quick", action="store_true", help="smoke sizes (< 60 s for one shape)")
    run.add_argument("--no-peers", action="store_true", help="charai only (no BullMQ, Celery or floors)")
    run.add_argument(
        "--drain", action="store_true", help="B2: also the pre-filled drain variant (~3 min more)"
    )
    run.add_argument(
        "--gateway-processes",
        type=int,
        default=1,
        help="B4/B4b: CHARAI_GATEWAY_PROCESSES of charai's gateway (0: one per core; default 1)",
    )
    run.add_argument(
        "--channels",
        type=int,
        default=1,
        help="B4/B4b: client connections the load is spread over (default 1; the kernel gives each "
        "connection to one gateway process, so give at least as many as --gateway-processes)",
    )
    run.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    run.add_argument(
        "--md", type=Path, default=None, help="where to write the report (default BENCHMARKS.md)"
    )
    run.add_argument("--no-md", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, argv: list[str]) -> Path:
    shapes = [s.strip().upper() for s in args.shape.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in suite.SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(suite.SHAPES)}")
    options = suite.Options(
        runs=args.runs or (1 if args.quick else 3),
        n=args.n,
        quick=args.quick,
        peers=not args.no_peers,
        seconds=args.seconds,
        latency=args.latency,
        drain=args.drain,
        gateway_processes=args.gateway_processes,
        channels=max(1, args.channels),
    )
    if options.peers:
        peers.setup()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_file = args.out_dir / f"{stamp}.json"
    started = time.monotonic()
    results: dict[str, object] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": " ".join(argv),
            "file": out_file.name,
            "quick": args.quick,
            "options": vars(options),
            "machine": machine(),
            # bench.common.CORE_LOOP's seconds: "start" here, "end" after the last shape.
            "core_speed_s": {"start": round(core_speed(), 3)},
            "commit": commit(),
            "versions": versions(),
            # gRPC's transport (charai.core.grpcenv): the services, this client and the floors alike.
            "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
        },
        "shapes": {},
    }
    for name in shapes:
        results["shapes"][name] = await suite.run_shape(name, options)  # type: ignore[index]
        results["meta"]["seconds"] = time.monotonic() - started  # type: ignore[index]
        out_file.write_text(json.dumps(results, indent=1, default=str))
    results["meta"]["core_speed_s"]["end"] = round(core_speed(), 3)  # type: ignore[index]
    out_file.write_text(json.dumps(results, indent=1, default=str))
    log(f"raw results: {out_file}")
    if not args.no_md and (args.md or not args.quick):
        write_report(results, args.md or ROOT / "BENCHMARKS.md")
    return out_file


def write_report(results: dict[str, object], md: Path) -> None:
    if ANALYSIS.exists():
        results["notes"] = ANALYSIS.read_text()
    md.write_text(report.render(results))
    log(f"report: {md}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.cmd == "setup":
        peers.setup()
        return
    if args.cmd == "profile":
        from bench.profile import profile

        n = args.n or (1000 if args.shape in ("B3", "B5") else 3000)
        asyncio.run(profile(args.shape, n, args.seconds))
        return
    if args.cmd == "report":
        write_report(json.loads(args.results.read_text()), args.md)
        return
    asyncio.run(run(args, argv))


if __name__ == "__main__":
    main()
