"""Webhook deliveries: written with their event (outbox), dispatched one at a time per task and
endpoint, claimed and settled by webhook senders, listed and replayed by tenants.

**Order.** A task's deliveries to one endpoint leave in event order: only the head of that queue
(its pending delivery with the lowest sequence) is ever published to JetStream; settling it for
good publishes the next. A receiver never gets ``completed`` before ``started``.

**Progress coalescing.** A progress delivery waits ``progress_interval`` before it may be sent;
a later event of the same task replaces a progress delivery not yet attempted (latest wins), so
an endpoint gets at most one progress per task per interval.

**Secrets** are never stored (``webhook_secrets``): derived from the signing key and the
tenant's secret version, the one thing the database holds.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog
from charai.core import ids
from charai.core.clock import Clock
from charai.core.domain import webhooks as rules
from charai.core.domain.webhooks import DeliveryStatus
from charai.core.errors import NotFoundError
from charai.core.validation import RequestInvalidError, Violation, validate_redeliver
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backend import Backend, Row, Tx
from charai.task_store.queries import decode_page_token, encode_page_token
from charai.task_store.webhook_secrets import WebhookSecrets
from charai.tasks.v1 import task_pb2, task_service_pb2

log = structlog.get_logger("task_store")

_PENDING, _DELIVERED, _FAILED = (
    int(DeliveryStatus.PENDING),
    int(DeliveryStatus.DELIVERED),
    int(DeliveryStatus.FAILED),
)
#: Tasks whose pending deliveries one statement reads (:meth:`Webhooks._dispatch_heads`).
_TASKS_PER_READ = 500
#: The pending deliveries of some tasks (``marks``: a ``?`` per task). ``+status`` is not an index
#: term, so both databases read the queue index by task id, not every pending delivery by the
#: status index (which each chose for ``status = ?``).
_HEADS = (
    "SELECT task_id, url, seq, id, dispatched, dispatch_gen FROM webhook_deliveries"
    " WHERE task_id IN ({marks}) AND +status = ?"
)
#: A delivery's job is out (its dispatch generation, its id).
_MARK_DISPATCHED = "UPDATE webhook_deliveries SET dispatched = 1, dispatch_gen = ? WHERE id = ?"
#: A delivery's job handed to the relay (:meth:`Webhooks._job`).
_OUTBOX_INSERT = (
    "INSERT INTO outbox (task_id, dispatch_gen, subject, payload, created) VALUES (?, ?, ?, ?, ?)"
)
_COLUMNS = "id, task_id, url, event_type, seq, status, next_attempt_at, created, event"


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookConfig:
    """The delivery rules' settings (README, "Webhooks")."""

    #: Secret from which every tenant's signing secrets are derived (empty: webhooks unsigned
    #: is not an option, the app always passes one).
    signing_key: bytes = b""
    schedule: tuple[float, ...] = rules.SCHEDULE
    #: Consecutive failures after which an endpoint is disabled (0: never).
    disable_after: int = 20
    progress_interval_seconds: float = 1.0
    secret_grace_seconds: float = 86400.0
    #: How long a sender holds a claimed delivery (more than its HTTP timeout).
    claim_seconds: float = 60.0


def receiver(url: str) -> str:
    """A delivery's receiver as its job names it (``WebhookJob.host``): the URL's host, with its
    port when the URL gives one; empty for a URL without a host or with a bad port."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return ""
    host = parts.hostname or ""
    if not host or port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Webhooks:
    """The store's webhook operations (the gRPC API and the units of work call these)."""

    def __init__(
        self,
        backend: Backend,
        subject: str,
        clock: Clock,
        config: WebhookConfig,
        rng: random.Random | None = None,
    ) -> None:
        self._db = backend
        self._subject = subject
        self._clock = clock
        self.config = config
        self.secrets = WebhookSecrets(backend, clock, config.signing_key, config.secret_grace_seconds)
        self._rng = rng or random.Random()
        #: Called after a commit that disabled an endpoint, with (tenant, endpoint host) (metrics).
        self.on_disabled: Callable[[str, str], None] | None = None

    # -- inside a unit of work ---------------------------------------------------------------
    async def on_event(self, tx: Tx, tenant: str, event: task_pb2.TaskEvent, now: int) -> int:
        """Records the delivery of a stored event (if the task's webhook wants it); returns how
        many jobs it queued in the outbox (0 or 1)."""
        hook = event.task.webhook
        if not hook.url or not rules.wanted(rules.parse_events(hook.events), event.type):
            return 0
        task_id, url = event.task.id, hook.url
        # A progress delivery not yet attempted is superseded by any later event (latest wins).
        superseded = await tx.fetch(
            "DELETE FROM webhook_deliveries WHERE task_id = ? AND url = ? AND status = ? AND event_type = ?"
            " AND attempts = 0 AND (claimed_until IS NULL OR claimed_until < ?) RETURNING next_attempt_at",
            task_id,
            url,
            _PENDING,
            int(rules.EVENT_NAMES["progress"]),
            now,
        )
        disabled = await tx.fetchval(
            "SELECT disabled_at FROM webhook_endpoints WHERE tenant = ? AND url = ?", tenant, url
        )
        due = now
        if rules.is_progress(event.type):
            # Due one interval after the first progress since the last one sent, not after the
            # newest: a task reporting more often than the interval still gets one each interval
            # (the timer started again at each report, so it got none until it stopped).
            due = min(
                [now + int(self.config.progress_interval_seconds * 1e6), *(int(r[0]) for r in superseded)]
            )
        await tx.execute(
            "INSERT INTO webhook_deliveries (id, tenant, task_id, url, event_type, seq, event, status,"
            " next_attempt_at, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            f"msg_{ids.uuid7_hex(now)}",
            tenant,
            task_id,
            url,
            int(event.type),
            event.sequence,
            event.SerializeToString(),
            _PENDING if disabled is None else _FAILED,
            due,
            now,
            now,
        )
        return await self._dispatch_head(tx, task_id, url, now)

    async def _dispatch_head(self, tx: Tx, task_id: str, url: str, now: int) -> int:
        """:meth:`_dispatch_heads` for one queue."""
        return await self._dispatch_heads(tx, [(task_id, url)], now)

    async def _dispatch_heads(self, tx: Tx, queues: Collection[tuple[str, str]], now: int) -> int:
        """Publishes (through the outbox) the head of each (task, url) queue of ``queues`` unless
        it is already out; returns how many jobs it queued. One read for each
        :data:`_TASKS_PER_READ` tasks and one statement for all the writes: a redelivery of
        thousands of deliveries is not a round trip to PostgreSQL per statement per delivery."""
        wanted = set(queues)
        heads: dict[tuple[str, str], Row] = {}
        tasks = sorted({task_id for task_id, _ in wanted})
        for start in range(0, len(tasks), _TASKS_PER_READ):
            chunk = tasks[start : start + _TASKS_PER_READ]
            rows = await tx.fetch(_HEADS.format(marks=", ".join("?" * len(chunk))), *chunk, _PENDING)
            for row in rows:
                key = (str(row[0]), str(row[1]))
                if key in wanted and (key not in heads or int(row[2]) < int(heads[key][2])):
                    heads[key] = row
        due = [(str(heads[k][3]), k[1], int(heads[k][5]) + 1) for k in sorted(heads) if not heads[k][4]]
        await tx.executemany(_MARK_DISPATCHED, [(gen, delivery_id) for delivery_id, _, gen in due])
        await tx.executemany(_OUTBOX_INSERT, [self._job(*delivery, now) for delivery in due])
        return len(due)

    def _job(self, delivery_id: str, url: str, gen: int, now: int) -> tuple[object, ...]:
        """The outbox row of a delivery's job (:data:`_OUTBOX_INSERT`'s arguments)."""
        job = spb.WebhookJob(delivery_id=delivery_id, host=receiver(url))
        return (delivery_id, gen, self._subject, job.SerializeToString(), now)

    # -- the lost-job sweep (the relay's sweeper) ---------------------------------------------
    async def stale(self, older_than_s: float, limit: int = 200) -> list[tuple[str, int, int | None]]:
        """Claims pending deliveries whose job is out but that nobody took for ``older_than_s``
        past their due time: (delivery id, dispatch gen, stream seq), for the sweeper to check
        the job is still in the stream. Claiming moves their due time to now, so the next sweeps
        leave them alone for ``older_than_s`` (as the task sweep does with ``dispatched_at``).

        A delivery whose job row is still in the outbox is not a suspect (as in the task
        sweep): its job is not published yet, or a relay published it and stopped before
        recording its sequence, and the relays publish it (again: JetStream drops the repeat).
        Taken for lost, it was published a second time and sent twice
        (tests/faults/test_webhook_crash.py, after task_store was killed and restarted)."""

        async def body(tx: Tx) -> list[tuple[str, int, int | None]]:
            now = self._clock.now_us()
            rows = await tx.fetch(
                "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id IN ("
                "SELECT id FROM webhook_deliveries WHERE status = ? AND dispatched = 1"
                " AND next_attempt_at < ? AND (claimed_until IS NULL OR claimed_until < ?)"
                " AND id NOT IN (SELECT task_id FROM outbox)"
                f" ORDER BY next_attempt_at LIMIT ?{self._db.dialect.skip_locked})"
                " RETURNING id, dispatch_gen, stream_seq",
                now,
                _PENDING,
                now - int(older_than_s * 1e6),
                now,
                limit,
            )
            return [(str(r[0]), int(r[1]), None if r[2] is None else int(r[2])) for r in rows]

        return await self._db.write(body)

    async def redispatch(self, delivery_id: str, seen_gen: int) -> bool:
        """Publishes a delivery's job again (a new generation) if it is still pending with the
        generation the sweeper saw; True if it did."""

        async def body(tx: Tx) -> bool:
            row = await tx.fetchrow(
                "SELECT task_id, url FROM webhook_deliveries"
                f" WHERE id = ? AND status = ? AND dispatch_gen = ?{self._db.dialect.for_update}",
                delivery_id,
                _PENDING,
                seen_gen,
            )
            if row is None:
                return False
            await tx.execute("UPDATE webhook_deliveries SET dispatched = 0 WHERE id = ?", delivery_id)
            return await self._dispatch_head(tx, str(row[0]), str(row[1]), self._clock.now_us()) > 0

        return await self._db.write(body)

    async def forget_task(self, tx: Tx, task_id: str) -> None:
        """Removes a deleted task's deliveries and their attempts."""
        await tx.execute(
            "DELETE FROM webhook_attempts"
            " WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE task_id = ?)",
            task_id,
        )
        await tx.execute("DELETE FROM webhook_deliveries WHERE task_id = ?", task_id)

    # -- senders -----------------------------------------------------------------------------
    async def claim(self, delivery_id: str, sender_id: str) -> spb.ClaimWebhookDeliveryResponse:
        """What to send now, or why not (see ``ClaimWebhookDeliveryResponse``)."""

        async def body(tx: Tx) -> spb.ClaimWebhookDeliveryResponse:
            now = self._clock.now_us()
            row = await tx.fetchrow(
                "SELECT id, task_id, url, event_type, seq, status, next_attempt_at, attempts,"
                " claimed_by, claimed_until, event, tenant FROM webhook_deliveries"
                f" WHERE id = ?{self._db.dialect.for_update}",
                delivery_id,
            )
            if row is None or int(row[5]) != _PENDING:
                return spb.ClaimWebhookDeliveryResponse(outcome=spb.CLAIM_OUTCOME_DONE)
            head = await tx.fetchval(
                "SELECT id FROM webhook_deliveries WHERE task_id = ? AND url = ? AND status = ?"
                " ORDER BY seq LIMIT 1",
                row[1],
                row[2],
                _PENDING,
            )
            if head != delivery_id:  # settled out of order by a redelivery: the head goes first
                await tx.execute("UPDATE webhook_deliveries SET dispatched = 0 WHERE id = ?", delivery_id)
                return spb.ClaimWebhookDeliveryResponse(outcome=spb.CLAIM_OUTCOME_DONE)
            wait_us = max(int(row[6]) - now, 0)
            if row[8] and row[8] != sender_id and row[9] is not None and int(row[9]) > now:
                wait_us = max(wait_us, int(row[9]) - now)
            if wait_us > 0:
                return spb.ClaimWebhookDeliveryResponse(
                    outcome=spb.CLAIM_OUTCOME_DEFER, retry_after_seconds=wait_us / 1e6
                )
            await tx.execute(
                "UPDATE webhook_deliveries SET claimed_by = ?, claimed_until = ? WHERE id = ?",
                sender_id,
                now + int(self.config.claim_seconds * 1e6),
                delivery_id,
            )
            return spb.ClaimWebhookDeliveryResponse(
                outcome=spb.CLAIM_OUTCOME_RUN,
                url=row[2],
                event_type=rules.payload_type(int(row[3])),
                event=task_pb2.TaskEvent.FromString(bytes(row[10])),
                secrets=await self.secrets.signing(tx, str(row[11]), now),
                attempt=int(row[7]) + 1,
            )

        return await self._db.write(body)

    async def settle(
        self, req: spb.SettleWebhookDeliveryRequest
    ) -> tuple[spb.SettleWebhookDeliveryResponse, int]:
        """Records an attempt and decides what follows; also returns how many jobs it queued."""
        queued = 0
        disabled: list[tuple[str, str]] = []

        async def body(tx: Tx) -> spb.SettleWebhookDeliveryResponse:
            nonlocal queued
            queued = 0
            disabled.clear()
            now = self._clock.now_us()
            row = await tx.fetchrow(
                "SELECT tenant, task_id, url, status, attempts, claimed_by FROM webhook_deliveries"
                f" WHERE id = ?{self._db.dialect.for_update}",
                req.delivery_id,
            )
            if row is not None and int(row[3]) == _FAILED and row[5] == req.sender_id:
                # Failed while this sender posted it: its endpoint was disabled (by another
                # delivery's answer), which fails every pending delivery but not a post already
                # made. The attempt is recorded, and a 2xx delivered it all the same.
                await self._record_attempt(tx, req, int(row[4]) + 1, now)
                await tx.execute(
                    "UPDATE webhook_deliveries SET status = ?, attempts = ?, updated = ?,"
                    " claimed_by = NULL, claimed_until = NULL WHERE id = ?",
                    _DELIVERED if 200 <= req.http_status < 300 else _FAILED,
                    int(row[4]) + 1,
                    now,
                    req.delivery_id,
                )
                return spb.SettleWebhookDeliveryResponse(outcome=spb.SETTLE_OUTCOME_DONE)
            if row is None or int(row[3]) != _PENDING or row[5] != req.sender_id:
                return spb.SettleWebhookDeliveryResponse(outcome=spb.SETTLE_OUTCOME_DONE)
            tenant, task_id, url, attempts = str(row[0]), str(row[1]), str(row[2]), int(row[4]) + 1
            await self._record_attempt(tx, req, attempts, now)
            decision = await self._decide(tx, req, tenant, url, attempts)
            await self._apply(tx, req.delivery_id, tenant, url, attempts, decision, now)
            if decision.disable:
                disabled.append((tenant, urlsplit(url).hostname or ""))
            if decision.status is DeliveryStatus.PENDING:
                return spb.SettleWebhookDeliveryResponse(
                    outcome=spb.SETTLE_OUTCOME_RETRY, retry_after_seconds=decision.retry_in or 0.0
                )
            queued = await self._dispatch_head(tx, task_id, url, now)
            return spb.SettleWebhookDeliveryResponse(outcome=spb.SETTLE_OUTCOME_DONE)

        response = await self._db.write(body)
        for tenant, host in disabled:
            if self.on_disabled is not None:
                self.on_disabled(tenant, host)
        return response, queued

    async def _record_attempt(
        self, tx: Tx, req: spb.SettleWebhookDeliveryRequest, number: int, now: int
    ) -> None:
        latency_us = req.latency.seconds * 1_000_000 + req.latency.nanos // 1000
        await tx.execute(
            "INSERT INTO webhook_attempts (delivery_id, n, time, http_status, latency_us, error)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            req.delivery_id,
            number,
            now - latency_us,
            req.http_status,
            latency_us,
            req.error[:500],
        )

    async def _decide(
        self, tx: Tx, req: spb.SettleWebhookDeliveryRequest, tenant: str, url: str, attempts: int
    ) -> rules.AfterAttempt:
        streak = await tx.fetchval(
            "SELECT streak FROM webhook_endpoints WHERE tenant = ? AND url = ?", tenant, url
        )
        return rules.after_attempt(
            attempts,
            req.http_status,
            req.retry_after_seconds if req.retry_after_seconds >= 0 else None,
            int(streak or 0),
            disable_after=self.config.disable_after,
            schedule=self.config.schedule,
            rng=self._rng,
        )

    async def _apply(
        self,
        tx: Tx,
        delivery_id: str,
        tenant: str,
        url: str,
        attempts: int,
        decision: rules.AfterAttempt,
        now: int,
    ) -> None:
        """Writes the decision: the delivery, the endpoint's streak, and on disabling, every
        delivery still pending for that endpoint fails (none is sent)."""
        await self._endpoint(tx, tenant, url, decision.streak, now if decision.disable else None)
        await tx.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, updated = ?,"
            " dispatched = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            int(decision.status),
            attempts,
            now + int((decision.retry_in or 0) * 1e6),
            now,
            1 if decision.status is DeliveryStatus.PENDING else 0,
            delivery_id,
        )
        if decision.disable:
            await tx.execute(
                "UPDATE webhook_deliveries SET status = ?, updated = ?"
                " WHERE tenant = ? AND url = ? AND status = ?",
                _FAILED,
                now,
                tenant,
                url,
                _PENDING,
            )
            log.warning(
                "webhook_endpoint_disabled",
                tenant=tenant,
                host=urlsplit(url).hostname,
                streak=decision.streak,
            )

    async def _endpoint(self, tx: Tx, tenant: str, url: str, streak: int, disabled_at: int | None) -> None:
        await tx.execute(
            "INSERT INTO webhook_endpoints (tenant, url, streak, disabled_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant, url) DO UPDATE SET streak = excluded.streak,"
            " disabled_at = COALESCE(excluded.disabled_at, webhook_endpoints.disabled_at)",
            tenant,
            url,
            streak,
            disabled_at,
        )

    # -- tenants -----------------------------------------------------------------------------
    async def list_deliveries(
        self, tenant: str, req: task_service_pb2.ListWebhookDeliveriesRequest
    ) -> task_service_pb2.ListWebhookDeliveriesResponse:
        size = req.page_size or 50
        if not 0 < size <= 500:
            raise RequestInvalidError([Violation("page_size", "must be between 1 and 500")])
        where: list[str] = ["tenant = ?"]
        args: list[Any] = [tenant]
        for column, value in (("task_id", req.task_id), ("url", req.url)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if req.status:
            where.append("status = ?")
            args.append(int(req.status))
        if req.page_token:
            created, last_id = decode_page_token(req.page_token)
            where.append("(created < ? OR (created = ? AND id < ?))")
            args.extend([created, created, last_id])

        async def body(tx: Tx) -> task_service_pb2.ListWebhookDeliveriesResponse:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM webhook_deliveries WHERE {' AND '.join(where)}"
                " ORDER BY created DESC, id DESC LIMIT ?",
                *args,
                size + 1,
            )
            out = task_service_pb2.ListWebhookDeliveriesResponse()
            page = rows[:size]
            attempts = await self._attempts(tx, [str(row[0]) for row in page])
            for row in page:
                out.deliveries.append(self._delivery(row, attempts.get(str(row[0]), ())))
            if len(rows) > size:
                last = rows[size - 1]
                out.next_page_token = encode_page_token(int(last[7]), str(last[0]))
            return out

        return await self._db.read(body)

    @staticmethod
    async def _attempts(tx: Tx, delivery_ids: list[str]) -> dict[str, list[Sequence[Any]]]:
        """The attempts of a page's deliveries, in order, with one query (not one per delivery)."""
        if not delivery_ids:
            return {}
        marks = ", ".join("?" * len(delivery_ids))
        found: dict[str, list[Sequence[Any]]] = {}
        for row in await tx.fetch(
            "SELECT delivery_id, time, http_status, latency_us, error FROM webhook_attempts"
            f" WHERE delivery_id IN ({marks}) ORDER BY delivery_id, n",
            *delivery_ids,
        ):
            found.setdefault(str(row[0]), []).append(row[1:])
        return found

    @staticmethod
    def _delivery(row: Sequence[Any], attempts: Iterable[Sequence[Any]]) -> task_service_pb2.WebhookDelivery:
        delivery = task_service_pb2.WebhookDelivery(
            id=row[0],
            task_id=row[1],
            url=row[2],
            event_type=rules.payload_type(int(row[3])),
            sequence=int(row[4]),
            status=int(row[5]),  # type: ignore[arg-type]
        )
        if int(row[5]) == _PENDING:
            delivery.next_attempt_time.FromMicroseconds(int(row[6]))
        delivery.create_time.FromMicroseconds(int(row[7]))
        for time, status, latency_us, error in attempts:
            attempt = delivery.attempts.add(http_status=int(status), error=str(error))
            attempt.time.FromMicroseconds(int(time))
            attempt.latency.FromMicroseconds(int(latency_us))
        return delivery

    async def redeliver(self, tenant: str, req: task_service_pb2.RedeliverWebhookRequest) -> tuple[int, int]:
        """Queues deliveries again (same ids) and re-enables their endpoints; (how many, jobs queued)."""
        since = validate_redeliver(req)

        async def body(tx: Tx) -> tuple[int, int]:
            now = self._clock.now_us()
            if req.delivery_id:
                rows = await tx.fetch(
                    "SELECT id, task_id, url FROM webhook_deliveries WHERE tenant = ? AND id = ?",
                    tenant,
                    req.delivery_id,
                )
                if not rows:
                    raise NotFoundError(
                        f"webhook delivery {req.delivery_id} not found", resource="webhook delivery"
                    )
            else:
                rows = await tx.fetch(
                    "SELECT id, task_id, url FROM webhook_deliveries"
                    " WHERE tenant = ? AND status = ? AND created >= ?",
                    tenant,
                    _FAILED,
                    since,
                )
            # One being posted right now is left to that post, whose answer is recorded and
            # decides (taking its claim away posted it twice and dropped the first answer).
            await tx.executemany(
                "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, dispatched = 0,"
                " claimed_by = NULL, claimed_until = NULL, updated = ? WHERE id = ?"
                " AND (claimed_until IS NULL OR claimed_until <= ?)",
                [(_PENDING, now, now, row[0], now) for row in rows],
            )
            for url in sorted({str(row[2]) for row in rows}):
                await self._endpoint(tx, tenant, url, 0, None)
                await tx.execute(
                    "UPDATE webhook_endpoints SET disabled_at = NULL WHERE tenant = ? AND url = ?",
                    tenant,
                    url,
                )
            queued = await self._dispatch_heads(tx, {(str(row[1]), str(row[2])) for row in rows}, now)
            return len(rows), queued

        return await self._db.write(body)
