"""Prometheus metrics: one registry per process, and the metrics every charai service exposes.

Why a registry per :class:`Metrics` instead of prometheus-client's module-global default: tests
run several services (two task_stores, a gateway, workers) in one process, and each must expose
exactly its own numbers; a process in production simply has one. Nothing is registered in the
default registry.

Where each family is fed:

- task_store (the only writer of task state, so each transition is counted once, by the replica
  that committed it; sum over replicas): ``charai_tasks_created_total``, ``..._completed_total``,
  ``..._failed_total`` (by error code), ``charai_task_retries_total`` (by reason = error code),
  ``charai_task_duration_seconds`` (creation to end, by type and outcome), and the gauges
  refreshed from the database every few seconds: ``charai_queue_depth``,
  ``charai_queue_waiting_retry``, ``charai_queue_in_flight`` (per type and priority) and
  ``charai_outbox_backlog``. The gauges are the same on every replica (they come from SQL):
  aggregate them with ``max``, not ``sum``.
- workers: ``charai_worker_jobs_in_flight`` and ``charai_provider_call_duration_seconds``; with
  shared provider limits also ``charai_provider_breaker_state``, ``charai_provider_limit`` and
  ``charai_provider_in_flight`` per credential (the same on every worker: aggregate with ``max``).
- gateway: ``charai_watch_streams_open``.
- task_store also: ``charai_webhook_endpoints_disabled_total`` (by endpoint host).
- webhook sender: ``charai_webhook_attempts_total`` (by endpoint host and outcome),
  ``charai_webhook_attempt_duration_seconds`` (by host), ``charai_webhooks_in_flight`` and
  ``charai_webhooks_parked_total`` (by receiver).
- every service: ``charai_gc_pause_seconds`` (Python's garbage collector, :mod:`charai.core.gcpauses`).
- every gRPC server: ``charai_rpc_requests_total`` and ``charai_rpc_duration_seconds`` by method
  and code; task_store also ``charai_exchange_commands`` (commands per ``Exchange`` call, by the
  kind of the first command: how well gateways and workers coalesce).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from charai.core.gcpauses import GcPauseCollector
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsServer"]

#: Seconds: a TTS call takes about one, an image a few to a few tens, a queue wait up to hours.
_TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180)
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric family of charai, on this instance's own registry.

    A service touches only the families it feeds; the others are exposed with no samples
    (labelled) or at zero, which costs a few lines of text.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tasks(r)
        self._queues(r)
        self._workers(r)
        self._webhooks(r)
        self._rpcs(r)
        r.register(GcPauseCollector())

    def _tasks(self, r: CollectorRegistry) -> None:
        """task_store: every transition, counted once by the replica that committed it."""
        self.tasks_created = Counter("charai_tasks_created", "Tasks accepted", ["type"], registry=r)
        self.tasks_completed = Counter("charai_tasks_completed", "Tasks completed", ["type"], registry=r)
        self.tasks_failed = Counter(
            "charai_tasks_failed", "Tasks failed for good, by error code", ["type", "code"], registry=r
        )
        self.tasks_cancelled = Counter("charai_tasks_cancelled", "Tasks cancelled", ["type"], registry=r)
        self.task_retries = Counter(
            "charai_task_retries", "Retries scheduled, by reason (error code)", ["type", "reason"], registry=r
        )
        self.task_duration = Histogram(
            "charai_task_duration_seconds",
            "Creation (queued) to end, by type and outcome",
            ["type", "outcome"],
            buckets=_TASK_BUCKETS,
            registry=r,
        )

    def _queues(self, r: CollectorRegistry) -> None:
        """task_store: gauges refreshed from the database."""
        self.queue_depth = Gauge(
            "charai_queue_depth", "Queued tasks a worker may pick up now", ["type", "priority"], registry=r
        )
        self.queue_waiting_retry = Gauge(
            "charai_queue_waiting_retry", "Queued tasks waiting for a retry", ["type", "priority"], registry=r
        )
        self.queue_in_flight = Gauge(
            "charai_queue_in_flight", "Running tasks", ["type", "priority"], registry=r
        )
        self.outbox_backlog = Gauge(
            "charai_outbox_backlog", "Jobs not yet confirmed published to JetStream", registry=r
        )
        self.jobs_pushed = Counter(
            "charai_jobs_pushed", "New tasks claimed for an idle worker's offer (push dispatch)", registry=r
        )
        self.push_offers = Gauge(
            "charai_push_offers_open", "Worker streams with an offer of free slots standing", registry=r
        )

    def _workers(self, r: CollectorRegistry) -> None:
        """Workers and the gateway's watch streams."""
        self.jobs_in_flight = Gauge(
            "charai_worker_jobs_in_flight", "Jobs this worker holds", ["kind"], registry=r
        )
        self.provider_call_duration = Histogram(
            "charai_provider_call_duration_seconds",
            "Provider HTTP calls (request, download), by operation and outcome (HTTP status or error)",
            ["kind", "operation", "outcome"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.watch_streams = Gauge("charai_watch_streams_open", "Open watch streams", registry=r)
        # One provider credential's shared limiter and breaker, as this worker sees them (the
        # same on every worker of the credential: aggregate with max).
        labels = ["kind", "credential", "model"]
        self.provider_breaker_state = Gauge(
            "charai_provider_breaker_state",
            "Breaker of a provider credential: 0 closed, 1 half-open (one probe out), 2 open",
            labels,
            registry=r,
        )
        self.provider_limit = Gauge(
            "charai_provider_limit",
            "Calls allowed in flight to a provider credential, shared by every worker (0: no limit yet)",
            labels,
            registry=r,
        )
        self.provider_in_flight = Gauge(
            "charai_provider_in_flight",
            "Calls in flight to a provider credential from every worker (others as of their last write)",
            labels,
            registry=r,
        )

    def _webhooks(self, r: CollectorRegistry) -> None:
        """The webhook sender (attempts) and task_store (disabled endpoints)."""
        self.webhook_attempts = Counter(
            "charai_webhook_attempts",
            "Webhook delivery attempts, by endpoint host and outcome (HTTP status, none, refused)",
            ["host", "outcome"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "charai_webhook_attempt_duration_seconds",
            "Webhook delivery attempts, send to answer, by endpoint host",
            ["host"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.webhook_endpoints_disabled = Counter(
            "charai_webhook_endpoints_disabled",
            "Webhook endpoints disabled (a 410, or too many failures in a row), by host",
            ["host"],
            registry=r,
        )
        self.webhooks_in_flight = Gauge(
            "charai_webhooks_in_flight", "Webhook deliveries this sender is posting", registry=r
        )
        self.webhooks_parked = Counter(
            "charai_webhooks_parked",
            "Webhook delivery jobs put back to wait, their receiver busy with slow attempts, by receiver",
            ["receiver"],
            registry=r,
        )

    def _rpcs(self, r: CollectorRegistry) -> None:
        """Every gRPC server."""
        self.rpc_requests = Counter(
            "charai_rpc_requests", "gRPC calls served, by method and code", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "charai_rpc_duration_seconds",
            "gRPC call latency by method",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )

        self.exchange_commands = Histogram(
            "charai_exchange_commands",
            "Commands per Exchange call (task_store: how well callers' calls coalesce)",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
            registry=r,
        )
        #: Labelled children of the families above, by their labels (see :meth:`observe_rpc`).
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._exchange_children: dict[str, Any] = {}
        self.exchange_streams = Gauge(
            "charai_exchange_streams_open",
            "Open ExchangeStream calls (task_store: one per gateway or worker process and address)",
            registry=r,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """The hook :class:`charai.core.grpcsupport.ServerInterceptor` calls after each RPC.

        The labelled children are looked up once per (method, code) and kept: ``labels()``
        checks and locks on every call, about twice what the increment and observation cost.
        """
        children = self._rpc_children.get((method, code))
        if children is None:
            name = method.rsplit("/", 1)[-1]
            children = self._rpc_children[(method, code)] = (
                self.rpc_requests.labels(name, code),
                self.rpc_duration.labels(name),
            )
        children[0].inc()
        children[1].observe(seconds)

    def exchange_size(self, kind: str, commands: int) -> None:
        """One ``Exchange`` call of ``commands`` commands, the first of them of ``kind``."""
        child = self._exchange_children.get(kind)
        if child is None:
            child = self._exchange_children[kind] = self.exchange_commands.labels(kind)
        child.observe(commands)

    def gauge_from(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` reads ``read()`` at each scrape (e.g. a live counter of the process)."""
        gauge.set_function(read)

    def render(self) -> bytes:
        """The text exposition format (``Content-Type``: :data:`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` on its own port (``CHARAI_METRICS_ADDR``) for processes without an HTTP
    server of their own (task_store, workers): prometheus-client's threaded WSGI server, so a
    scrape never waits on the event loop."""

    def __init__(self, metrics: Metrics, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        self._server: Any
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(
            int(port), host or "127.0.0.1", registry=metrics.registry
        )
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
