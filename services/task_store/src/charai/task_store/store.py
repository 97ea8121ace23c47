"""The task store: tasks, metadata index, append-only event log and outbox — on any backend.

One facade over the parts, each in its own module:

- :mod:`~charai.task_store.commands`: writes (create, claim, progress, complete, fail, cancel,
  re-run, re-dispatch), each one transaction: load → the lifecycle core decides → persist;
- :mod:`~charai.task_store.units`: units of work, their events appended last under the events
  lock (sequence order = commit order) and published after commit;
- :mod:`~charai.task_store.queries` and :mod:`~charai.task_store.stats`: reads;
- :mod:`~charai.task_store.usage`: metered usage (written with outcomes), budgets checked at
  create, GetUsage;
- :mod:`~charai.task_store.outbox`: jobs written with their task, claimed by relays, swept;
- :mod:`~charai.task_store.backlog`: tasks held for fair share between tenants, released in turn;
- :mod:`~charai.task_store.rows`: stored rows ↔ the core's task state.

Every operation is written once over the :class:`~charai.task_store.backend.Tx` port;
:class:`SqliteStore` and :class:`PostgresStore` only choose the backend. Time comes from the
injected :class:`~charai.core.clock.Clock`, so tests move it instead of sleeping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from charai.core.clock import SYSTEM, Clock
from charai.core.domain.lifecycle import Policy
from charai.core.domain.retry import RetryPolicy
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import Backend
from charai.task_store.backlog import Backlog, FairConfig
from charai.task_store.commands import ClaimResult, Commands, WorkerAnswer, WorkerRequest
from charai.task_store.creates import Asker
from charai.task_store.eta import EtaBook
from charai.task_store.outbox import Outbox, OutboxRow
from charai.task_store.postgres_backend import PostgresBackend
from charai.task_store.push import Offers
from charai.task_store.queries import Queries
from charai.task_store.reuse import Reuse, ReuseConfig
from charai.task_store.sqlite_backend import SqliteBackend
from charai.task_store.stats import QueueStats
from charai.task_store.units import EventsHook, UnitRunner
from charai.task_store.usage import UsageConfig, UsageLedger
from charai.task_store.webhooks import WebhookConfig, Webhooks
from charai.tasks.v1 import task_pb2, task_service_pb2

__all__ = [
    "ClaimResult",
    "OutboxRow",
    "PostgresStore",
    "SqliteStore",
    "StoreConfig",
    "TaskStore",
    "open_store",
]


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    max_attempts: int = 6
    lease_seconds: float = 30.0
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    namespace: str = "charai"
    #: How long a relay owns the outbox rows it claimed. A relay that dies (or cannot reach
    #: NATS) without marking them leaves them to the other replicas after this.
    outbox_claim_seconds: float = 30.0
    #: How long a job handed straight to the local relay stays claimed by it (short: it only has
    #: to cover one publish; a relay that died before publishing holds it no longer than this).
    hand_off_claim_seconds: float = 5.0
    webhooks: WebhookConfig = dataclasses.field(default_factory=WebhookConfig)
    #: Budgets per tenant and the price table (metering is always on; no budget by default).
    usage: UsageConfig = dataclasses.field(default_factory=UsageConfig)
    #: Reuse of identical requests (off unless configured; the service turns it on by default).
    reuse: ReuseConfig = dataclasses.field(default_factory=ReuseConfig)
    #: Fair share between tenants: weights, the buffer of released jobs, priority aging.
    fair: FairConfig = dataclasses.field(default_factory=FairConfig)

    @property
    def policy(self) -> Policy:
        """The lifecycle rules' settings."""
        return Policy(max_attempts=self.max_attempts, lease_seconds=self.lease_seconds, retry=self.retry)


class TaskStore:
    """The store's operations (used by the gRPC API and the dispatch loops) over a backend."""

    def __init__(
        self,
        backend: Backend,
        config: StoreConfig,
        on_events: EventsHook | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._db = backend
        #: Lanes' start rates and run times, fed by every commit (estimated times of tasks).
        self.eta = EtaBook()

        def committed(envelopes: list[spb.EventEnvelope]) -> None:
            self.eta.observe(envelopes)
            if on_events is not None:
                on_events(envelopes)

        self._units = UnitRunner(backend, committed)
        self._units.eta = self.eta
        self.outbox = Outbox(
            backend,
            Topology(config.namespace),
            clock,
            config.outbox_claim_seconds,
            config.hand_off_claim_seconds,
        )
        self.backlog = Backlog(backend, self.outbox, config.fair, clock, self.eta.started_within)
        self.queries = Queries(backend, clock, self.eta)
        self.commands = Commands(backend, self._units, self.outbox, self.queries, config.policy, clock)
        self.usage = UsageLedger(backend, clock, config.usage)
        self.commands.usage = self.usage
        self.reuse = Reuse(backend, config.reuse)
        self.commands.reuse = self.reuse
        self._clock = clock
        self._lease_seconds = config.lease_seconds
        self.commands.backlog = self.backlog
        self._stats = QueueStats(backend, clock)
        self.webhooks = Webhooks(backend, Topology(config.namespace).webhook_subject, clock, config.webhooks)
        self._units.webhooks = self.webhooks

    @property
    def backend(self) -> Backend:
        return self._db

    def describe(self) -> str:
        """``<dialect>: <where>`` for logs (never a password)."""
        return f"{self._db.dialect.name}: {self._db.describe()}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> TaskStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def hand_off(self, owner: str, take: Callable[[list[OutboxRow]], None]) -> None:
        """Hands the jobs a create queues straight to the local relay ``owner``.

        Why: the job's outbox row is written claimed for that relay (for
        ``hand_off_claim_seconds``) in the create's own transaction, so the relay publishes it at
        once instead of first claiming it in a transaction of its own (one commit less between a
        create and its pickup). Every relay's claims, the owner's included, leave the row alone
        while that claim lasts (:func:`~charai.task_store.outbox.handed_claimant`: the hand-off
        is its only publisher, so no claim racing the hand-off publishes it twice); if the relay
        dies or fails to publish it, the claim expires and any relay publishes it.

        A new task's job is handed over once no later write can be decided before the create's
        commit (``on_sealed`` of :meth:`Backend.write`): on SQLite from the database thread
        before the COMMIT, so the job travels to a worker while the commit's fsync runs (the
        worker's claim is run by that thread after the commit); on PostgreSQL right after the
        commit. A commit that fails after the hand-off leaves a job whose task never existed:
        its claim is answered DONE, the worker drops it, and the relay's record of it removes
        no other row. Jobs released from the fair backlog are handed over after the commit
        (see ``Unit.handed_new`` for why). ``take`` may be called from the database thread.
        """
        self.outbox.hand_off_owner = owner
        self._units.hand_off = take

    @property
    def hands_off(self) -> bool:
        """Whether new jobs are handed straight to a local relay (:meth:`hand_off`)."""
        return bool(self.outbox.hand_off_owner)

    def push_dispatch(self) -> Offers:
        """Turns push dispatch on (:mod:`charai.task_store.push`): the registry the
        ExchangeStream handler records workers' offers in."""
        offers = Offers(self._lease_seconds)
        self.commands.offers = self._units.offers = offers
        return offers

    def on_outbox(self, wake: Callable[[], None]) -> None:
        """Calls ``wake`` after a commit that wrote outbox rows nobody was handed (webhook
        deliveries), possibly from the database thread."""
        self._units.on_outbox = wake

    # -- client operations -------------------------------------------------------------------
    async def create(
        self,
        tenant: str,
        req: task_service_pb2.CreateTaskRequest,
        traceparent: str = "",
        scope: spb.CreateScope | None = None,
    ) -> tuple[task_pb2.Task, bool]:
        return await self.commands.create(tenant, req, traceparent, scope)

    async def create_many(
        self,
        tenant: str,
        requests: Sequence[task_service_pb2.CreateTaskRequest],
        traceparent: str = "",
        scope: spb.CreateScope | None = None,
    ) -> list[tuple[task_pb2.Task, bool]]:
        return await self.commands.create_many(tenant, requests, traceparent, scope)

    async def create_each(
        self,
        tenant: str,
        batches: Sequence[Sequence[tuple[task_service_pb2.CreateTaskRequest, str]]],
        askers: Sequence[Asker] = (),
    ) -> list[list[tuple[task_pb2.Task, bool]] | Exception]:
        return await self.commands.create_each(tenant, batches, askers)

    async def get(self, tenant: str, task_id: str) -> task_pb2.Task:
        return await self.queries.get(tenant, task_id)

    async def list_tasks(
        self, tenant: str, req: task_service_pb2.ListTasksRequest
    ) -> tuple[list[task_pb2.Task], str]:
        return await self.queries.list_tasks(tenant, req)

    async def cancel(self, tenant: str, task_id: str) -> tuple[task_pb2.Task, bool]:
        return await self.commands.cancel(tenant, task_id)

    async def list_events(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int]:
        return await self.queries.list_events(req)

    async def events_page(self, req: spb.ListEventsRequest) -> tuple[list[task_pb2.TaskEvent], int, bool]:
        return await self.queries.events_page(req)

    async def tenant_of(self, task_id: str) -> str | None:
        return await self.queries.tenant_of(task_id)

    async def deletable(self, tenant: str, task_id: str) -> task_pb2.Task:
        return await self.commands.deletable(tenant, task_id)

    async def shared_media(self, tenant: str, task_id: str) -> frozenset[str]:
        """Detaches an ended task from reuse; the media keys of its result another task still uses."""
        return await self.reuse.shared_media(tenant, task_id)

    async def delete(self, tenant: str, task_id: str) -> bool:
        return await self.commands.delete(tenant, task_id)

    async def ended_before(self, cutoff_us: int, limit: int = 200) -> list[tuple[str, task_pb2.Task]]:
        return await self.queries.ended_before(cutoff_us, limit)

    # -- worker operations -------------------------------------------------------------------
    async def claim(
        self, task_id: str, dispatch_gen: int, worker_id: str, again: bool = False, any_task: bool = False
    ) -> ClaimResult:
        return await self.commands.claim(task_id, worker_id, again, any_task)

    async def progress(self, task_id: str, attempt: int, progress: int, stage: str) -> int:
        return await self.commands.progress(task_id, attempt, progress, stage)

    async def complete(self, req: spb.CompleteTaskRequest) -> task_pb2.Task:
        return await self.commands.complete(req)

    async def worker_each(self, requests: Sequence[WorkerRequest]) -> list[WorkerAnswer | Exception]:
        return await self.commands.worker_each(requests)

    async def fail(self, req: spb.FailTaskRequest) -> tuple[int, float, task_pb2.Task]:
        return await self.commands.fail(req)

    # -- operator operations -----------------------------------------------------------------
    async def retry(self, tenant: str, task_id: str) -> task_pb2.Task:
        """Re-runs a FAILED task: QUEUED again, error cleared, ``max_attempts`` extended by the
        configured budget, a new dispatch generation and its outbox row, and a QUEUED event."""
        return await self.commands.rerun(tenant, task_id)

    async def queue_stats(self) -> tuple[list[task_service_pb2.LaneStats], int]:
        return await self._stats.read()

    async def queue_gauges(self) -> tuple[list[task_service_pb2.LaneStats], int]:
        """The lanes' depths, retry waits and in-flight counts, and the outbox backlog (the rest
        of :meth:`queue_stats` left at zero)."""
        return await self._stats.gauges()

    async def get_usage(
        self, tenant: str, request: task_service_pb2.GetUsageRequest
    ) -> task_service_pb2.GetUsageResponse:
        """Usage by tenant, provider, model and day (every tenant when ``tenant`` is empty)."""
        return await self.usage.report(tenant, request)

    # -- fair share --------------------------------------------------------------------------
    async def release_held(self, kind: int) -> tuple[int, bool]:
        """Releases held tasks of type ``kind`` in fair order into the room of its buffer (one
        transaction; their jobs go to the local relay); returns (how many, whether more may be
        released at once)."""
        return await self._units.write(lambda unit: self.backlog.release(unit, kind, self._clock.now_us()))

    async def held_kinds(self, kinds: tuple[int, ...]) -> list[int]:
        """The task types, of ``kinds``, that have held tasks."""
        return await self._db.read(lambda tx: self.backlog.held_anywhere(tx, kinds))

    # -- outbox and sweeper ------------------------------------------------------------------
    async def pending_dispatches(self, limit: int = 256) -> list[OutboxRow]:
        return await self.outbox.pending(limit)

    async def claim_dispatches(
        self, owner: str, limit: int = 256, sent: Sequence[tuple[OutboxRow, int]] = ()
    ) -> list[OutboxRow]:
        return await self.outbox.claim(owner, limit, sent)

    async def release_dispatches(self, owner: str, sent: Sequence[tuple[OutboxRow, int]] = ()) -> None:
        await self.outbox.release(owner, sent)

    async def mark_dispatched(self, sent: Sequence[tuple[OutboxRow, int]]) -> None:
        await self.outbox.mark(sent)

    async def stale_dispatches(
        self, older_than_s: float, limit: int = 200
    ) -> list[tuple[str, int, int | None]]:
        return await self.outbox.stale(older_than_s, limit)

    async def touch_dispatch(self, task_ids: Iterable[str]) -> None:
        await self.outbox.touch(task_ids)

    async def redispatch(self, task_id: str, seen_gen: int) -> bool:
        return await self.commands.redispatch(task_id, seen_gen)


class SqliteStore(TaskStore):
    """The task store on a SQLite file (WAL, synchronous=FULL): the embedded default."""

    def __init__(
        self, path: Path, config: StoreConfig, on_events: EventsHook | None = None, clock: Clock = SYSTEM
    ) -> None:
        super().__init__(SqliteBackend(path), config, on_events, clock)


class PostgresStore(TaskStore):
    """The task store on PostgreSQL: the scale-out backend, shared by several replicas."""

    def __init__(
        self,
        url: str,
        config: StoreConfig,
        on_events: EventsHook | None = None,
        *,
        password: str | None = None,
        pool_size: int = 10,
        clock: Clock = SYSTEM,
    ) -> None:
        backend = PostgresBackend(url, password=password, pool_size=pool_size)
        super().__init__(backend, config, on_events, clock)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(
    url: str,
    config: StoreConfig,
    on_events: EventsHook | None = None,
    *,
    password: str | None = None,
    pool_size: int = 10,
    clock: Clock = SYSTEM,
) -> TaskStore:
    """The store for a database URL: ``sqlite:///path`` or ``postgresql://…`` (not opened yet)."""
    if is_postgres_url(url):
        return PostgresStore(url, config, on_events, password=password, pool_size=pool_size, clock=clock)
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url[len("sqlite:///") :]), config, on_events, clock)
    raise ValueError("the database URL must start with sqlite:/// or postgresql://")
