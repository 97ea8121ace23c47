"""The store's write path without gRPC: ``python -m bench.store_inproc [--n N] [--concurrency C]
[--batch B] [--each G] [--reports R [--lone]] [--lifecycle R] [--pages N] [--relay]``.

Creates TTS tasks on a fresh SQLite store in this process (task_store's own settings: reuse on, a
fair-share buffer of 64), from C coroutines at once so they share group commits, and prints the
creates per second, the CPU per create and the bytes this process wrote per create (WAL and
checkpoints, from /proc/self/io). ``--batch B``: each call is ``create_many`` of B (one unit of
work); ``--each G``: each call is ``create_each`` of G single creates (one transaction, a savepoint
each: what task_store does with the creates of one Exchange call). ``--reports R``: progress
reports instead, R rounds of one report for each of 100 running tasks (a ``gather`` of single
reports, or with ``--each`` one ``worker_each`` per round; with ``--lone`` one report at a time,
each alone in its commit, as a report that arrives alone is: user and system CPU apart, and the
commits counted). ``--lifecycle R``: R rounds of 50 tasks claimed and then completed (single
commands at once, or with ``--each`` one ``worker_each`` per step: what task_store does with a
worker's commands of one Exchange call). ``--pages N``: N
tasks created, claimed, reported on and completed one command at a time, each its own commit;
prints the WAL pages each kind of commit wrote, by table and index (the WAL is read between
groups of commands, so no checkpoint runs in between, the checkpointer thread included). Used for
the before/after rows of BENCHMARKS.md ("Data plane v2, second pass"). ``--relay``: with
``--lifecycle`` or ``--pages``, each task's job is also recorded as published, as the outbox relay
does after its publish (``--lifecycle``: one record of the round's 50 jobs before their claims;
``--pages``: a "publish" commit per task between its create and its claim). ``--commit-times``: also
times each COMMIT (its fsync, and any checkpoint the writer runs in it) and prints p50, p99 and
how many took over 3 ms; ``--own-checkpoints``: without task_store's checkpointer thread
(``charai.task_store.sqlite_checkpoint``), SQLite checkpointing inside commits as by default.
``--stats-every MS [--prefill R]``: N creates one at a time (each alone in its commit, as an
idle store's are) while GetQueueStats' read (``TaskStore.queue_stats``) runs every MS ms (0:
never), on an event log of R rounds of 50 tasks created, claimed and completed first (default
400: 20,000 tasks, 60,000 events); prints the creates' latency p50, p99, p99.9 and max and the reads'
own p50: what a dashboard polling the queue statistics (or a metrics scrape) costs the writes.
``--budget-records R``: R usage records of this month for a tenant with a monthly budget, then N
creates one at a time for that tenant and for one without budgets; prints each one's p50 and p99
(what a budget check costs a create, and the writes queued behind it). ``--list-every MS
[--queued Q]``: Q tasks of one tenant created (default 5,000: all but the fair-share buffer's 64
held), then N creates of another tenant one at a time while ListTasks reads the newest 500 of the
first tenant's every MS ms, each with its queue position; prints as ``--stats-every`` does: what
a user's page of a long queue costs everyone's writes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import sqlite3
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from charai.core.domain import usage as rules
from charai.core.domain.prices import PriceTable
from charai.core.tenants import parse_tenants
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backlog import FairConfig
from charai.task_store.reuse import ReuseConfig
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.sqlite_checkpoint import INTERVAL
from charai.task_store.store import StoreConfig, TaskStore
from charai.task_store.usage import UsageConfig
from charai.tasks.v1 import task_pb2, task_service_pb2

from bench.common import pct
from bench.ours import tts_request

PER_ROUND = 50


async def timed_creates(store: TaskStore, tenant: str, n: int, label: str) -> list[float]:
    """``n`` creates of ``tenant``, one at a time (each alone in its commit, as an idle store's
    are), their texts never seen before; each one's latency in ms."""
    run, took = time.time_ns(), []
    for i in range(n):
        began = time.perf_counter()
        await store.create(tenant, tts_request(label, f"line {run} {tenant} {i}"))
        took.append((time.perf_counter() - began) * 1000)
    return took


async def stats_beside(store: TaskStore, n: int, every_ms: float, prefill: int) -> None:
    """``n`` creates one at a time while the queue statistics are read every ``every_ms`` (see
    the module); latencies printed."""
    await lifecycle(store, prefill, True)
    await reads_beside(store, n, every_ms, store.queue_stats, "the queue statistics read")


async def lists_beside(store: TaskStore, n: int, every_ms: float, queued: int) -> None:
    """``queued`` tasks of tenant ``lister`` created (all but the buffer's held), then ``n``
    creates of another tenant one at a time while the newest 500 of them are listed every
    ``every_ms`` (see the module); latencies printed."""
    await timed_creates(store, "lister", queued, "queued")
    page = task_service_pb2.ListTasksRequest(page_size=500)
    what = f"a page of 500 of {queued} queued tasks listed"
    await reads_beside(store, n, every_ms, lambda: store.list_tasks("lister", page), what)


async def reads_beside(
    store: TaskStore, n: int, every_ms: float, read: Callable[[], Awaitable[object]], what: str
) -> None:
    """``n`` creates one at a time while ``read`` runs every ``every_ms`` (0: never)."""
    stop = asyncio.Event()
    reads: list[float] = []

    async def poll() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await read()
            reads.append((time.perf_counter() - began) * 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_ms / 1000)

    poller = asyncio.create_task(poll()) if every_ms > 0 else None
    took = await timed_creates(store, "default", n, "beside")
    stop.set()
    if poller is not None:
        await poller
    print(
        f"{n} creates one at a time, {what} every {every_ms:g} ms"
        f" ({len(reads)} reads, p50 {pct(reads, 0.5):.2f} ms): create p50 {pct(took, 0.5):.2f},"
        f" p99 {pct(took, 0.99):.2f}, p99.9 {pct(took, 0.999):.2f}, max {max(took):.2f} ms"
    )


async def budgeted(store: TaskStore, n: int, records: int) -> None:
    """``records`` usage records this month for the budgeted tenant, then ``n`` creates one at a
    time for it and for a tenant without budgets (see the module); latencies printed."""
    now = int(time.time() * 1e6)
    day = rules.day_of(now)
    rows = [
        (f"r{i}", 1, "budgeted", "zhipu", "glm-tts", day, now - i, 1, 0, "", "", 10, 10**6, 150, 0)
        for i in range(records)
    ]
    await store.backend.write(
        lambda tx: tx.executemany(f"INSERT INTO usage_records VALUES ({', '.join('?' * 15)})", rows)
    )
    for tenant in ("budgeted", "default"):
        took = await timed_creates(store, tenant, n, "budget")
        print(
            f"{records} usage records this month, {n} creates one at a time of tenant {tenant}:"
            f" p50 {pct(took, 0.5):.2f}, p99 {pct(took, 0.99):.2f} ms"
        )


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes"):
            return int(line.split()[1])
    return 0


async def creates(store: TaskStore, n: int, concurrency: int, batch: int, each: int) -> None:
    request = tts_request("inproc", "the same line every time")
    left = [n]

    async def lane() -> None:
        while left[0] > 0:
            if each:
                left[0] -= each
                await store.create_each("default", [[(request, "")]] * each)
            else:
                left[0] -= batch
                await store.create_many("default", [request] * batch)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


async def reports(store: TaskStore, rounds: int, each: bool, lone: bool = False) -> None:
    """``rounds`` progress reports for each of 100 running tasks; CPU-µs per report printed.
    ``lone``: one report at a time, each alone in its commit (user and system CPU apart)."""
    ids = []
    for k in range(100):
        task, _ = await store.create("default", tts_request(f"inproc-{k}", f"line {k}"))
        await store.claim(task.id, 1, "inproc")
        ids.append(task.id)
    if lone:
        backend = store._db  # its commit count: one per report, or the reports were not lone
        commits, times, wall = backend.commits, os.times(), time.perf_counter()
        for r in range(rounds):
            for task_id in ids:
                await store.progress(task_id, 1, 11 + r, "generating")
        wall = time.perf_counter() - wall
        after, n, commits = os.times(), rounds * len(ids), backend.commits - commits
        user, system = (after.user - times.user) / n * 1e6, (after.system - times.system) / n * 1e6
        print(
            f"{n} progress reports, lone: {n / wall:,.0f} reports/s, {user:.0f} user and"
            f" {system:.0f} system CPU-us per report, {commits} commits"
        )
        return
    cpu, wall = time.process_time(), time.perf_counter()
    for r in range(rounds):
        if each:
            await store.worker_each(
                [
                    spb.ReportProgressRequest(task_id=t, attempt=1, progress=11 + r, stage="generating")
                    for t in ids
                ]
            )
        else:
            await asyncio.gather(*(store.progress(task_id, 1, 11 + r, "generating") for task_id in ids))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    n = rounds * len(ids)
    print(
        f"{n} progress reports, each {each}: {n / wall:,.0f} reports/s, {cpu / n * 1e6:.0f} CPU-us per report"
    )


async def lifecycle(store: TaskStore, rounds: int, each: bool, relay: bool = False) -> None:
    """``rounds`` rounds of 50 distinct tasks (all released: the fair-share buffer holds 64)
    claimed, then completed (a ``gather`` of single commands,
    or with ``--each`` one ``worker_each`` per step); CPU-µs per claim + completion printed
    (``relay``: with the record of the round's publication before the claims)."""
    cpu = wall = 0.0
    run = time.time_ns()  # no two tasks alike (reuse would answer a claim with another's result)
    for r in range(rounds):
        made = await store.create_each(
            "default", [[(tts_request(f"life-{r}", f"line {run} {r} {k}"), "")] for k in range(PER_ROUND)]
        )
        ids = [batch[0][0].id for batch in made if not isinstance(batch, Exception)]
        claims = [
            spb.ClaimTaskRequest(task_id=task_id, dispatch_gen=1, worker_id="inproc") for task_id in ids
        ]
        result = task_pb2.TtsResult(audio_url="charai-media:x.wav", duration_seconds=1.0)
        dones = [spb.CompleteTaskRequest(task_id=task_id, attempt=1, tts_result=result) for task_id in ids]
        c0, w0 = time.process_time(), time.perf_counter()
        if relay:
            await publish(store)
        for step in (claims, dones):
            if each:
                answers = await store.worker_each(step)
            else:
                answers = await asyncio.gather(*(_one(store, request) for request in step))
            assert not any(isinstance(a, Exception) for a in answers), "a command was refused"
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
    n = rounds * PER_ROUND
    print(
        f"{n} claims + completions, each {each}: {n / wall:,.0f} tasks/s, {cpu / n * 1e6:.0f} CPU-us per task"
    )


async def publish(store: TaskStore, task_id: str = "") -> None:
    """Records the jobs in the outbox (``task_id``'s only, if given) as published, in one
    commit, as the relay does after its publish (made-up stream sequences: nothing reads them)."""
    rows = [row for row in await store.pending_dispatches(1000) if task_id in ("", row.task_id)]
    await store.mark_dispatched([(row, 1_000_000 + row.id) for row in rows])


async def pages(store: TaskStore, path: Path, n: int, relay: bool = False) -> None:
    """WAL pages written per single-command commit, by b-tree (``dbstat``), for each kind."""
    result = task_pb2.TtsResult(audio_url="charai-media:x.wav", duration_seconds=1.0)
    run = time.time_ns()
    ids: list[str] = []

    async def create(i: int) -> None:
        ids.append((await store.create("default", tts_request(f"pages-{i}", f"line {run} {i}")))[0].id)

    steps = {
        "create": create,
        **({"publish": lambda i: publish(store, ids[i])} if relay else {}),
        "claim": lambda i: store.claim(ids[i], 1, "inproc"),
        "progress": lambda i: store.progress(ids[i], 1, 40, "generating"),
        "complete": lambda i: store.complete(
            spb.CompleteTaskRequest(task_id=ids[i], attempt=1, tts_result=result)
        ),
    }
    wal = Path(f"{path}-wal")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for kind, step in steps.items():
            counts: collections.Counter[str] = collections.Counter()
            for start in range(0, n, 20):  # 20 commits stay under the 1,000-page auto-checkpoint
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                for i in range(start, min(n, start + 20)):
                    await step(i)
                names = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
                data = wal.read_bytes()  # noqa: ASYNC240 - nothing else runs meanwhile
                for offset in range(32, len(data) - 23, 24 + 4096):  # WAL header, then frames
                    counts[names.get(struct.unpack(">I", data[offset : offset + 4])[0], "?")] += 1
            by = ", ".join(f"{name} {count / n:.2f}" for name, count in counts.most_common())
            print(f"{kind}: {sum(counts.values()) / n:.1f} WAL pages per commit ({by})")


async def _one(store: TaskStore, request: spb.ClaimTaskRequest | spb.CompleteTaskRequest) -> object:
    if isinstance(request, spb.ClaimTaskRequest):
        return await store.claim(request.task_id, request.dispatch_gen, request.worker_id)
    return await store.complete(request)


class TimedCommits:
    """The backend's connection, timing each COMMIT (``--commit-times``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.seconds: list[float] = []

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql != "COMMIT":
            return self._conn.execute(sql, *args)  # type: ignore[arg-type]
        start = time.perf_counter()
        try:
            return self._conn.execute(sql)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    def report(self) -> str:
        ms = sorted(s * 1000 for s in self.seconds)
        slow = sum(1 for m in ms if m > 3)
        return (
            f"{len(ms)} commits: p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.2f} ms,"
            f" max {ms[-1]:.2f} ms, {slow} over 3 ms"
        )


async def main(args: argparse.Namespace) -> None:
    config = StoreConfig(reuse=ReuseConfig(ttl_seconds=86400.0), fair=FairConfig(buffer=max(64, args.pages)))
    if args.budget_records is not None:
        budget = '[tenants.budgeted]\nbudgets = [{ period = "month", limit = 1000000, unit = "usd" }]\n'
        config = dataclasses.replace(config, usage=UsageConfig(parse_tenants(budget), PriceTable()))
    with tempfile.TemporaryDirectory(prefix="bench-inproc-") as tmp:
        interval = -1.0 if args.own_checkpoints or args.pages else INTERVAL
        backend = SqliteBackend(Path(tmp) / "tasks.db", checkpoint_interval=interval)
        store = TaskStore(backend, config, lambda envelopes: None)
        async with store:
            timed = None
            if args.commit_times:
                timed = backend._conn = TimedCommits(backend._conn)  # type: ignore[arg-type,assignment]
            await _run(store, Path(tmp), args)
            if timed is not None:
                print(timed.report())


async def _run(store: TaskStore, tmp: Path, args: argparse.Namespace) -> None:
    if args.pages:
        await pages(store, tmp / "tasks.db", args.pages, args.relay)
        return
    if args.reports:
        await reports(store, args.reports, bool(args.each), args.lone)
        return
    if args.budget_records is not None:
        await budgeted(store, args.n, args.budget_records)
        return
    if args.stats_every is not None:
        await stats_beside(store, args.n, args.stats_every, args.prefill)
        return
    if args.list_every is not None:
        await lists_beside(store, args.n, args.list_every, args.queued)
        return
    if args.lifecycle:
        await lifecycle(store, 3, bool(args.each), args.relay)  # warm-up
        await lifecycle(store, args.lifecycle, bool(args.each), args.relay)
        return
    await creates(store, 500, args.concurrency, args.batch, args.each)  # warm-up
    wrote, cpu, wall = written_bytes(), time.process_time(), time.perf_counter()
    await creates(store, args.n, args.concurrency, args.batch, args.each)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    wrote = written_bytes() - wrote
    print(
        f"{args.n} creates, {args.concurrency} at once, batch {args.batch}, each {args.each}:"
        f" {args.n / wall:,.0f} creates/s, {cpu / args.n * 1e6:.0f} CPU-us and"
        f" {wrote / args.n / 1024:.1f} KB written per create"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.store_inproc", description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--each", type=int, default=0)
    parser.add_argument("--reports", type=int, default=0)
    parser.add_argument("--lifecycle", type=int, default=0)
    parser.add_argument("--pages", type=int, default=0)
    parser.add_argument("--relay", action="store_true")
    parser.add_argument("--lone", action="store_true")
    parser.add_argument("--commit-times", action="store_true")
    parser.add_argument("--own-checkpoints", action="store_true")
    parser.add_argument("--stats-every", type=float, default=None)
    parser.add_argument("--prefill", type=int, default=400)
    parser.add_argument("--budget-records", type=int, default=None)
    parser.add_argument("--list-every", type=float, default=None)
    parser.add_argument("--queued", type=int, default=5000)
    parsed = parser.parse_args()
    if parsed.lone and (not parsed.reports or parsed.each or parsed.pages):
        parser.error("--lone goes with --reports R alone (not with --each or --pages): one report per commit")
    modes = {
        "--pages": parsed.pages,
        "--reports": parsed.reports,
        "--lifecycle": parsed.lifecycle,
        "--stats-every": parsed.stats_every is not None,
        "--budget-records": parsed.budget_records is not None,
        "--list-every": parsed.list_every is not None,
    }
    if sum(map(bool, modes.values())) > 1:  # each runs alone: the others would be ignored
        parser.error(
            f"one of {', '.join(modes)} at a time (given: {', '.join(m for m, v in modes.items() if v)})"
        )
    asyncio.run(main(parsed))
