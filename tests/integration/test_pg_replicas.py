"""Two task_store replicas on one PostgreSQL database and one real nats-server.

What several replicas must not break: every accepted task's job reaches JetStream once (the
relays claim outbox rows with ``SKIP LOCKED`` and never publish the same row at once), event
sequences stay gap-free for a resuming watcher while both replicas write (sequence order is
commit order), and a replica that goes away leaves its share of the outbox to the other.

Each test prints what it saw (``-s`` shows it): counts and timings for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import nats
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings
from charai.tasks.v1 import task_pb2, task_service_pb2
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.conftest import eventually, free_port

if TYPE_CHECKING:
    from tests.conftest import NatsServer
    from tests.pg import PgDatabase

STREAM = Topology().jobs_stream
TENANT = "t1"


def image_request(
    n: int, request_id: str = "", category: str = "replicas"
) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
        request_id=request_id,
        metadata={"category": category},
        image=task_pb2.ImagePayload(
            character_id=f"char_{n % 7}", prompt=f"knight {n}", resolution="1024x1024"
        ),
    )


@dataclasses.dataclass
class Replica:
    name: str
    app: TaskStoreApp
    client: StoreClient

    async def create(
        self, request: task_service_pb2.CreateTaskRequest, timeout: float = 10.0
    ) -> task_pb2.Task:
        return await self.client.create_task(TENANT, request, timeout=timeout)

    @property
    def published(self) -> int:
        assert self.app.relay is not None
        return self.app.relay.published

    @property
    def duplicates(self) -> int:
        assert self.app.relay is not None
        return self.app.relay.duplicates


def settings(nats_url: str, database_url: str, data_dir: Path) -> Settings:
    return Settings(
        nats_url=nats_url,
        data_dir=data_dir,
        database_url=database_url,
        lease_seconds=5.0,
        retry_base_seconds=0.05,
        shutdown_grace_seconds=1.0,
        # Every job released at once: these tests are about the outbox and the event log across
        # replicas (replicas releasing held tasks together are test_fair_share.py's).
        dispatch_buffer=1000,
    )


@contextlib.asynccontextmanager
async def replica(name: str, nats_url: str, database_url: str, data_dir: Path) -> AsyncIterator[Replica]:
    app = TaskStoreApp(settings(nats_url, database_url, data_dir / name), listen_addr="127.0.0.1:0")
    async with app, StoreClient(f"127.0.0.1:{app.port}") as client:
        yield Replica(name, app, client)


@contextlib.asynccontextmanager
async def two_replicas(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> AsyncIterator[tuple[Replica, Replica, JetStreamContext]]:
    nc = await nats.connect(nats_server.url)
    try:
        # Started together: their migrators meet on the advisory lock.
        async with contextlib.AsyncExitStack() as stack:
            a, b = await asyncio.gather(
                stack.enter_async_context(replica("a", nats_server.url, postgres.url, tmp_path)),
                stack.enter_async_context(replica("b", nats_server.url, postgres.url, tmp_path)),
            )
            yield a, b, nc.jetstream()
    finally:
        await nc.close()


async def stream_msg_ids(js: JetStreamContext) -> list[str]:
    """The ``Nats-Msg-Id`` of every message in the jobs stream."""
    state = (await js.stream_info(STREAM)).state
    ids: list[str] = []
    if not state.messages:
        return ids
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            msg = await js.get_msg(STREAM, seq)
        except NotFoundError:
            continue
        ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return ids


async def stream_count(js: JetStreamContext) -> int:
    return int((await js.stream_info(STREAM)).state.messages)


async def test_200_creates_over_two_replicas_publish_each_job_once(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    async with two_replicas(nats_server, postgres, tmp_path) as (a, b, js):
        started = time.monotonic()
        tasks = await asyncio.gather(*((a if n % 2 else b).create(image_request(n)) for n in range(200)))
        created_s = time.monotonic() - started

        async def all_out() -> bool:
            return await stream_count(js) == 200 and await postgres.count_rows("outbox") == 0

        await eventually(all_out, timeout=20)
        published_s = time.monotonic() - started
        # An empty outbox means no relay holds anything more to publish (a row leaves the outbox
        # only once its publish was acknowledged), so no later publish can come.
        msg_ids = await stream_msg_ids(js)
        assert len(msg_ids) == 200
        assert len(set(msg_ids)) == 200
        assert set(msg_ids) == {f"{t.id}:1" for t in tasks}
        # The relays themselves published every row once between them: no publish was left to
        # JetStream's duplicate window to absorb.
        assert a.published + b.published == 200, (a.published, b.published)
        assert a.duplicates + b.duplicates == 0
        print(
            f"\n200 creates over 2 replicas: accepted in {created_s:.2f} s, all published in"
            f" {published_s:.2f} s; relay a published {a.published}, relay b {b.published}, 0 duplicates"
        )


@dataclasses.dataclass
class Watcher:
    """Reads the event log the way the gateway does: from a cursor, moving it to what it read and,
    for a filter, to the head; remembers everything it was shown."""

    replica: Replica
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    cursor: int = 0
    seen: list[int] = dataclasses.field(default_factory=list)
    reads: int = 0

    async def poll(self) -> None:
        while True:
            response = await self.replica.client.list_events(
                spb.ListEventsRequest(tenant=TENANT, metadata=self.metadata, after_sequence=self.cursor)
            )
            self.reads += 1
            sequences = [e.sequence for e in response.events]
            assert all(s > self.cursor for s in sequences), (self.cursor, sequences)
            assert sequences == sorted(set(sequences)), sequences  # strictly increasing
            self.seen += sequences
            if sequences:
                self.cursor = sequences[-1]
            if len(sequences) < 500:
                # Caught up: everything up to the head is committed, so the cursor may move there
                # (what a filter watcher in the gateway does). The head is read before the events,
                # so events committed in between may already be past it.
                self.cursor = max(self.cursor, response.head_sequence)
                return


async def test_concurrent_writes_on_both_replicas_keep_sequences_gap_free_for_watchers(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    async with two_replicas(nats_server, postgres, tmp_path) as (a, b, _):
        replicas = (a, b)
        tasks = await asyncio.gather(
            *(
                replicas[n % 2].create(image_request(n, category="odd" if n % 2 else "even"))
                for n in range(60)
            )
        )
        watchers = [Watcher(a), Watcher(b), Watcher(b, {"category": "odd"}), Watcher(a, {"category": "even"})]
        stop = asyncio.Event()

        async def watch(watcher: Watcher) -> None:
            while not stop.is_set():
                await watcher.poll()

        def on(n: int) -> StoreClient:
            return replicas[n % 2].client  # each task's reports alternate between the replicas

        watching = [asyncio.create_task(watch(w)) for w in watchers]
        started = time.monotonic()
        claims = await asyncio.gather(*(on(n).claim_task(t.id, 1, f"w{n}") for n, t in enumerate(tasks)))
        assert all(c.outcome == spb.CLAIM_OUTCOME_RUN for c in claims)
        for step, progress in enumerate(range(20, 90, 10)):
            await asyncio.gather(
                *(on(n + step).report_progress(t.id, 1, progress, "generating") for n, t in enumerate(tasks))
            )
        results = task_pb2.ImageResult(image_url="charai-media:x.png", prompt="p", resolution="1024x1024")
        await asyncio.gather(*(on(n + 1).complete_task(t.id, 1, results) for n, t in enumerate(tasks)))
        writes_s = time.monotonic() - started
        stop.set()
        await asyncio.gather(*watching)
        for watcher in watchers:
            await watcher.poll()  # a last read after the writes ended

        assert a.app.store is not None
        everything, head = await a.app.store.list_events(spb.ListEventsRequest(tenant=TENANT, limit=5000))
        sequences = [e.sequence for e in everything]
        writes = 60 * (1 + 1 + 7 + 1)  # queued, started, 7 progress steps, completed
        assert len(sequences) == writes
        # No holes at all (nothing rolled back after taking a sequence), no event lost.
        assert sequences == list(range(1, writes + 1))
        assert head == writes
        odd = {e.sequence for e in everything if e.task.metadata["category"] == "odd"}
        for watcher in watchers:
            expected = sorted(odd) if watcher.metadata.get("category") == "odd" else None
            if watcher.metadata.get("category") == "even":
                expected = sorted(set(sequences) - odd)
            # What a watcher was shown is exactly the log (or its filter's share of it): nothing
            # committed below its cursor after it moved past.
            wanted = expected if expected is not None else sequences
            missed = sorted(set(wanted) - set(watcher.seen))
            assert not missed, f"watcher {watcher.metadata} never saw {len(missed)} events: {missed}"
            assert watcher.seen == wanted
        print(
            f"\n{len(tasks)} tasks, {writes} events written through 2 replicas in {writes_s:.2f} s"
            f" ({writes / writes_s:.0f} events/s) while 4 watchers made"
            f" {sum(w.reads for w in watchers)} reads: none saw a gap or a late smaller sequence"
        )


class Burst:
    """200 creates kept :attr:`WINDOW` in flight, the odd ones sent to replica a until it goes
    away. It goes away once it has accepted :attr:`CUT` creates (``cut`` is set): a moment the
    test arranges, with creates still in flight on both replicas, whatever the machine's speed."""

    WINDOW = 20
    CUT = 30

    def __init__(self) -> None:
        self.window = asyncio.Semaphore(self.WINDOW)
        self.cut = asyncio.Event()
        self.accepted: dict[str, str] = {}
        self.by_a = 0

    def accepted_by_a(self, task_id: str, request: task_service_pb2.CreateTaskRequest) -> None:
        self.accepted[request.request_id] = task_id
        self.by_a += 1
        if self.by_a == self.CUT:
            self.cut.set()


async def test_a_replica_closed_mid_burst_leaves_its_jobs_to_the_other(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        a_app = TaskStoreApp(
            settings(nats_server.url, postgres.url, tmp_path / "a"), listen_addr="127.0.0.1:0"
        )
        async with (
            replica("b", nats_server.url, postgres.url, tmp_path) as b,
            a_app,
            StoreClient(f"127.0.0.1:{a_app.port}") as a_client,  # outlives a: callers see it go
        ):
            a = Replica("a", a_app, a_client)
            burst = Burst()
            retried_on_b = 0

            async def submit(n: int) -> None:
                nonlocal retried_on_b
                request = image_request(n, request_id=f"burst-{n}")
                async with burst.window:
                    if n % 2 and not burst.cut.is_set():
                        try:
                            burst.accepted_by_a((await a.create(request, timeout=3.0)).id, request)
                            return
                        except grpc.aio.AioRpcError:
                            retried_on_b += 1  # a went away: the caller retries elsewhere, same request_id
                    burst.accepted[request.request_id] = (await b.create(request)).id

            async def close_a() -> None:
                await burst.cut.wait()
                await a_app.close()  # what `async with` does on the way out; closing twice is a no-op

            started = time.monotonic()
            await asyncio.gather(*(submit(n) for n in range(200)), close_a())
            a_published, a_duplicates = a.published, a.duplicates

            async def all_out() -> bool:
                return await stream_count(js) == 200 and await postgres.count_rows("outbox") == 0

            await eventually(all_out, timeout=20)
            done_s = time.monotonic() - started
            msg_ids = await stream_msg_ids(js)
            accepted = burst.accepted
            assert len(accepted) == 200
            assert len(set(accepted.values())) == 200
            assert await postgres.count_rows("tasks") == 200
            assert sorted(msg_ids) == sorted(f"{task_id}:1" for task_id in accepted.values())
            assert a_published > 0
            assert b.published > 0
            # Whatever a published but could not mark before it stopped, b published again and
            # JetStream dropped as a duplicate: the stream holds each job once either way.
            assert a_published + b.published - a_duplicates - b.duplicates == 200
            print(
                f"\nreplica a closed after accepting {burst.by_a} of a burst of 200 creates:"
                f" a published {a_published},"
                f" b published {b.published} ({b.duplicates} duplicates dropped by JetStream),"
                f" {retried_on_b} creates retried on b; all 200 jobs in the stream once after {done_s:.2f} s"
            )
    finally:
        await nc.close()


async def test_a_replica_killed_mid_burst_leaves_its_jobs_to_the_other(
    nats_server: NatsServer, postgres: PgDatabase, tmp_path: Path
) -> None:
    """Replica a is a real ``python -m charai.task_store`` process, killed with SIGKILL: no close,
    no give-back. Its unmarked claims expire (CHARAI_OUTBOX_CLAIM_SECONDS=2) and b publishes them;
    callers whose create died with a retry on b with the same request_id."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(
        {
            "CHARAI_NATS_URL": nats_server.url,
            "CHARAI_DATABASE_URL": postgres.url,
            "CHARAI_TASK_STORE_ADDR": f"127.0.0.1:{port}",
            "CHARAI_DATA_DIR": str(tmp_path / "a"),
            "CHARAI_OUTBOX_CLAIM_SECONDS": "2",
            "CHARAI_LOG_LEVEL": "warning",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "charai.task_store",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with (
            replica("b", nats_server.url, postgres.url, tmp_path) as b,
            StoreClient(f"127.0.0.1:{port}") as a_client,
        ):
            await a_client.list_events(spb.ListEventsRequest(tenant=TENANT), timeout=30.0)  # ready
            burst = Burst()
            retried_on_b = 0
            left_claimed = 0

            async def submit(n: int) -> None:
                nonlocal retried_on_b
                request = image_request(n, request_id=f"kill-{n}")
                async with burst.window:
                    if n % 2 and not burst.cut.is_set():
                        try:
                            task = await a_client.create_task(TENANT, request, timeout=2.0)
                            burst.accepted_by_a(task.id, request)
                            return
                        except grpc.aio.AioRpcError:
                            retried_on_b += 1
                    burst.accepted[request.request_id] = (await b.create(request)).id

            async def kill_a() -> None:
                nonlocal left_claimed
                await burst.cut.wait()
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                assert b.app.relay is not None
                left_claimed = int(
                    await postgres.fetchval(
                        "SELECT COUNT(*) FROM outbox WHERE claimed_by IS NOT NULL AND claimed_by <> $1",
                        b.app.relay.owner,
                    )
                )

            started = time.monotonic()
            await asyncio.gather(*(submit(n) for n in range(200)), kill_a())

            async def all_out() -> bool:
                return await stream_count(js) == 200 and await postgres.count_rows("outbox") == 0

            await eventually(all_out, timeout=20)
            done_s = time.monotonic() - started
            msg_ids = await stream_msg_ids(js)
            accepted = burst.accepted
            assert len(accepted) == 200
            assert len(set(accepted.values())) == 200
            assert await postgres.count_rows("tasks") == 200
            assert sorted(msg_ids) == sorted(f"{task_id}:1" for task_id in accepted.values())
            print(
                f"\nreplica a SIGKILLed mid-burst of 200 creates: a had accepted {burst.by_a},"
                f" {retried_on_b} creates failed on a and were retried on b, {left_claimed} outbox rows"
                f" were left claimed by a; b published {b.published} ({b.duplicates} dropped by"
                f" JetStream as duplicates); all 200 jobs in the stream once after {done_s:.2f} s"
            )
    finally:
        await nc.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
