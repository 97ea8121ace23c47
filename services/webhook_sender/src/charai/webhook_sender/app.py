"""Composition root of the webhook sender: NATS, the task_store client, the delivery loop."""

from __future__ import annotations

import contextlib

import structlog
from charai.core import logs, natsconn
from charai.core.keys import keys
from charai.core.lifecycle import ServiceApp, run_until_signal
from charai.core.media import MEDIA_URL_PREFIX, UrlSigner
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from charai.core.storeclient import StoreClient
from charai.core.topology import Topology
from charai.tasks.v1 import task_pb2
from charai.webhook_sender.sender import Sender
from charai.webhook_sender.settings import SenderSettings

log = structlog.get_logger("webhook_sender")

#: The gateway's generated media key (same data dir): payload media URLs verify there.
MEDIA_KEY_FILE = "media-signing.key"


class SenderApp(ServiceApp):
    """One sender process; its parts on an AsyncExitStack (a failed start closes what it opened;
    close is idempotent): NATS, the task_store client, the loop."""

    stopped = "webhook_sender_stopped"

    def __init__(self, settings: SenderSettings) -> None:
        super().__init__()
        self.settings = settings
        self.sender: Sender | None = None
        self.metrics = Metrics("webhook_sender")

    def _presenter(self) -> UrlSigner:
        s = self.settings
        return UrlSigner(
            keys(s.media_signing_key.get_secret_value(), s.data_dir, MEDIA_KEY_FILE), int(s.media_url_ttl)
        )

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        topology = Topology(s.namespace)
        signer, base = self._presenter(), s.base_url()

        def present(task: task_pb2.Task) -> task_pb2.Task:
            for result, field in ((task.image_result, "image_url"), (task.tts_result, "audio_url")):
                ref = getattr(result, field)
                if ref.startswith(MEDIA_URL_PREFIX):
                    setattr(result, field, signer.sign(base, ref[len(MEDIA_URL_PREFIX) :]))
            return task

        nc = await natsconn.connect(s.nats_url, "charai-webhook-sender")
        stack.push_async_callback(natsconn.drain, nc)
        js = nc.jetstream()
        await natsconn.ensure_jobs_stream(js, topology, s.nats_replicas)
        store = await stack.enter_async_context(
            StoreClient(
                s.task_store_addr,
                s.internal_token.get_secret_value(),
                coalesce=True,
                stream=s.exchange_stream,
            )
        )
        self.sender = sender = Sender(
            js,
            store,
            topology,
            sender_id=s.sender_id,
            present=present,
            concurrency=s.webhook_concurrency,
            receiver_concurrency=s.webhook_receiver_concurrency,
            timeout=s.webhook_timeout_seconds,
            allow_private=s.webhook_allow_private_urls,
            ack_wait=s.webhook_ack_wait_seconds,
            replicas=s.nats_replicas,
            observe=self._observe,
            parked=self._parked,
        )
        await sender.start()
        stack.push_async_callback(sender.close, s.shutdown_grace_seconds)
        await stack.enter_async_context(
            MetricsEndpoint(
                self.metrics,
                s.metrics_addr,
                live=[(self.metrics.webhooks_in_flight, lambda: sender.in_flight)],
            )
        )
        logs.announce("webhook_sender_started", concurrency=s.webhook_concurrency, sender_id=s.sender_id)

    def _parked(self, receiver: str) -> None:
        self.metrics.webhooks_parked.labels(receiver).inc()

    def _observe(self, host: str, outcome: str, seconds: float) -> None:
        self.metrics.webhook_attempts.labels(host, outcome).inc()
        self.metrics.webhook_duration.labels(host).observe(seconds)


async def serve(app: SenderApp) -> None:
    await run_until_signal(app, "webhook_sender")
