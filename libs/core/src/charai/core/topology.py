"""Names on NATS: streams, subjects, consumers and buckets, all under one namespace."""

from __future__ import annotations

import dataclasses

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

    @property
    def events_subject(self) -> str:
        """The event bus: one message (an ``EventBatch``) per publish of task_store, carrying the
        envelopes of every commit since its previous one, in commit order. Events are not
        published per task any more (one message per event was the bus's cost); every consumer
        reads this subject and handles the batch's envelopes one by one."""
        return f"{self.namespace}.events.batch"

    @property
    def events_wildcard(self) -> str:
        """Everything under ``events.``: the batch subject, and the per-task subjects
        (``<ns>.events.<tenant token>.<task id>``, one ``EventEnvelope`` each) that task_store
        published before it batched, which a gateway still reads during a rolling upgrade."""
        return f"{self.namespace}.events.>"

    def cancel_subject(self, task_id: str) -> str:
        return f"{self.namespace}.cancel.{task_id}"

    @property
    def cancel_wildcard(self) -> str:
        return f"{self.namespace}.cancel.*"

    @property
    def media_bucket(self) -> str:
        return f"{self.namespace}-media"

    @property
    def providers_bucket(self) -> str:
        """KV bucket of the provider credentials' shared limiters and breakers."""
        return f"{self.namespace}-providers"
