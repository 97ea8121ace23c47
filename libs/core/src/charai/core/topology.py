"""Names on NATS: streams, subjects, consumers and buckets, all under one namespace."""

from __future__ import annotations

import dataclasses
import hashlib

from charai.tasks.v1 import task_pb2

KIND_BY_TYPE: dict[int, str] = {
    task_pb2.TASK_TYPE_IMAGE_GENERATION: "image",
    task_pb2.TASK_TYPE_TTS_GENERATION: "tts",
}
LANE_BY_PRIORITY: dict[int, str] = {
    task_pb2.PRIORITY_HIGH: "high",
    task_pb2.PRIORITY_NORMAL: "normal",
    task_pb2.PRIORITY_LOW: "low",
    task_pb2.PRIORITY_UNSPECIFIED: "normal",
}
LANES = ("high", "normal", "low")


def tenant_token(tenant: str) -> str:
    """A subject-safe token for a tenant name (event subjects carry it, not the name)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    """Every NATS name charai uses, derived from one namespace (default ``charai``)."""

    namespace: str = "charai"

    @property
    def jobs_stream(self) -> str:
        return f"{self.namespace.upper()}_JOBS"

    def job_subject(self, task_type: int, priority: int) -> str:
        return f"{self.namespace}.jobs.{KIND_BY_TYPE[task_type]}.{LANE_BY_PRIORITY[priority]}"

    @property
    def jobs_subjects(self) -> str:
        return f"{self.namespace}.jobs.>"

    @property
    def webhook_subject(self) -> str:
        """Webhook deliveries that are due (in the jobs stream, pulled by webhook senders)."""
        return f"{self.namespace}.jobs.webhook.deliver"

    @property
    def webhook_consumer(self) -> str:
        return f"{self.namespace}-webhook-sender"

    def lane_subject(self, kind: str, lane: str) -> str:
        return f"{self.namespace}.jobs.{kind}.{lane}"

    def consumer(self, kind: str, lane: str) -> str:
        return f"{self.namespace}-{kind}-{lane}"

    def event_subject(self, tenant_token: str, task_id: str) -> str:
        return f"{self.namespace}.events.{tenant_token}.{task_id}"

    @property
    def events_wildcard(self) -> str:
        return f"{self.namespace}.events.>"

    def cancel_subject(self, task_id: str) -> str:
        return f"{self.namespace}.cancel.{task_id}"

    @property
    def cancel_wildcard(self) -> str:
        return f"{self.namespace}.cancel.*"

    @property
    def media_bucket(self) -> str:
        return f"{self.namespace}-media"
