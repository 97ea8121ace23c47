"""A media store (JetStream object store) that is away while a worker stores a result: the
attempt keeps trying for its patience (the provider's result is in hand; a new attempt would pay
for it again), then fails as a transient, retryable error, not as a handler crash."""

from __future__ import annotations

import asyncio
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
from structlog.testing import capture_logs

from tests.conftest import eventually

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
        # Only store_media is exercised: no progress reporter, no provider. No patience: the
        # connection here never comes back.
        ctx = AttemptContext(attempt, task, None, None, media, media_patience=0)  # type: ignore[arg-type]
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


@pytest.mark.parametrize("attempt_number", [1, 2])
async def test_a_put_waits_out_a_nats_restart_and_stores_the_result(
    nats_server: NatsServer, attempt_number: int
) -> None:
    """NATS goes away while the result is being stored and comes back within the attempt's
    patience: the same attempt stores it (no second provider call), readable afterwards."""
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js, topology = nc.jetstream(timeout=1.0), Topology()
        bucket = await natsconn.ensure_media_bucket(js, topology)
        media = MediaStore(bucket, js, topology.media_bucket)
        task = task_pb2.Task(id="task_" + "b" * 32)
        attempt = Attempt(msg=None, task_id=task.id, attempt=attempt_number)  # type: ignore[arg-type]
        ctx = AttemptContext(attempt, task, None, None, media, media_patience=120)  # type: ignore[arg-type]
        nats_server.stop()
        with capture_logs() as logs:
            put = asyncio.create_task(ctx.store_media(b"RIFF" + b"x" * 1000, "wav", "audio/wav"))
            # It failed at least once against the server that is gone, and is trying again.
            await eventually(lambda: any(e["event"] == "media_put_retry" for e in logs), timeout=60)
            assert not put.done()
            nats_server.start()
            stored = await asyncio.wait_for(put, timeout=120)
        assert stored.key == f"{task.id}.wav"
        assert await media.get(stored.key) == b"RIFF" + b"x" * 1000
    finally:
        await nc.close()
