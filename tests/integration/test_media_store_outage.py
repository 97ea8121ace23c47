"""A media store (JetStream object store) that is away while a worker stores a result: the
attempt fails as a transient, retryable error, not as a handler crash."""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats
import pytest
from charai.core import natsconn
from charai.core.domain.errors import ErrorKind
from charai.core.media import MediaStore
from charai.core.topology import Topology
from charai.tasks.v1 import task_pb2
from charai.worker.attempt import Attempt, AttemptContext
from charai.worker.provider import ProviderError

if TYPE_CHECKING:
    from tests.conftest import NatsServer


@pytest.mark.parametrize("attempt_number", [1, 2])  # a new object (two publishes), nats-py's put
async def test_a_media_store_outage_is_a_retryable_attempt_failure(
    nats_server: NatsServer, attempt_number: int
) -> None:
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    try:
        js, topology = nc.jetstream(timeout=1.0), Topology()
        bucket = await natsconn.ensure_media_bucket(js, topology)
        media = MediaStore(bucket, js, topology.media_bucket)
        task = task_pb2.Task(id="task_" + "a" * 32)
        attempt = Attempt(msg=None, task_id=task.id, attempt=attempt_number)  # type: ignore[arg-type]  # no message needed
        # Only store_media is exercised: no progress reporter, no provider.
        ctx = AttemptContext(attempt, task, None, None, media)  # type: ignore[arg-type]
        stored = await ctx.store_media(b"RIFF", "wav", "audio/wav")
        assert stored.key == f"{task.id}.wav"
        nats_server.stop()
        with pytest.raises(ProviderError) as failed:
            await ctx.store_media(b"RIFF", "wav", "audio/wav")
        assert failed.value.failure.kind is ErrorKind.PROVIDER_UNAVAILABLE
        assert failed.value.failure.retryable
        assert failed.value.failure.message.startswith("could not store the generated media")
    finally:
        await nc.close()
