"""A new object written in two publishes (``MediaStore.put(..., new=True)``, what a task's first
attempt does) is the object nats-py's own put writes: nats-py reads it back, describes it the
same way, replaces and deletes it without leaving chunks behind; a refused chunk leaves nothing. The media
store's own read (what the gateway's downloads use) reads either put's objects, and answers None
for an object whose chunks are gone instead of waiting for them forever."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from charai.core.media import MediaStore, MediaUnavailableError
from nats.js import api

BUCKET = "media_put_test"
KEY = "task_" + "b" * 32 + ".wav"


@pytest_asyncio.fixture
async def js(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _bucket(js: Any, name: str = BUCKET, max_bytes: int | None = None) -> Any:
    config = api.ObjectStoreConfig(bucket=name, storage=api.StorageType.FILE, max_bytes=max_bytes)
    return await js.create_object_store(name, config=config)


async def _messages(js: Any, name: str = BUCKET) -> int:
    return int((await js.stream_info(f"OBJ_{name}")).state.messages)


@pytest.mark.parametrize("size", [0, 5, 128 * 1024, 300_000])
async def test_a_new_object_reads_back_and_is_described_as_nats_py_describes_it(js: Any, size: int) -> None:
    bucket = await _bucket(js)
    data = os.urandom(size)
    await MediaStore(bucket, js, BUCKET).put(KEY, data, new=True)
    await bucket.put("reference", data)  # nats-py's own put of the same bytes
    got = await bucket.get(KEY)
    assert got.data == data
    ours, theirs = got.info, await bucket.get_info("reference")
    for field in ("size", "chunks", "digest", "bucket", "options", "deleted"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.name == KEY
    assert await MediaStore(bucket).get(KEY) == data
    # Two publishes per object of up to 128 KiB (chunk, meta); nothing else was written.
    chunks = -(-size // (128 * 1024))
    assert await _messages(js) == 2 * (chunks + 1)


async def test_a_new_object_is_replaced_and_deleted_without_leaving_its_chunks(js: Any) -> None:
    bucket = await _bucket(js)
    media = MediaStore(bucket, js, BUCKET)
    await media.put(KEY, os.urandom(200_000), new=True)  # 2 chunks + meta
    assert await _messages(js) == 3
    replacement = os.urandom(1000)
    await media.put(KEY, replacement)  # not new: nats-py's put, which removes the old chunks
    assert await media.get(KEY) == replacement
    assert await _messages(js) == 2
    await media.delete(KEY)
    assert await media.get(KEY) is None
    assert await _messages(js) == 1  # the deletion marker (meta) only


async def test_a_refused_chunk_leaves_no_chunks_and_no_object(js: Any) -> None:
    bucket = await _bucket(js, max_bytes=200_000)  # the second 128 KiB chunk does not fit
    media = MediaStore(bucket, js, BUCKET)
    with pytest.raises(nats.js.errors.APIError):
        await media.put(KEY, os.urandom(300_000), new=True)
    assert await media.get(KEY) is None
    assert await _messages(js) == 0
    await media.put(KEY, b"RIFF", new=True)  # the bucket is usable, the key still free
    assert await media.get(KEY) == b"RIFF"


async def test_without_the_jetstream_context_every_put_is_nats_pys(js: Any) -> None:
    bucket = await _bucket(js)
    media = MediaStore(bucket)
    await media.put(KEY, b"one", new=True)
    await media.put(KEY, b"two", new=True)  # nats-py's put replaces it (and its chunks)
    assert await media.get(KEY) == b"two"
    assert await _messages(js) == 2


@pytest.mark.parametrize(("attempt_number", "lookups"), [(1, 0), (2, 1)])
async def test_a_tasks_first_attempt_stores_its_media_without_looking_it_up(
    js: Any, attempt_number: int, lookups: int
) -> None:
    """What a worker does: attempt 1 writes the task's key first (no JetStream API request);
    a later attempt may replace an earlier attempt's object, so it uses nats-py's put (one
    lookup of the object it replaces).

    Counted by the server: the account's JetStream API request total (``account_info``), which
    the put's chunk and meta publishes do not touch. (A subscriber to every subject missed the
    lookup request once in a full run, with the put's publishes seen around it.)"""
    from charai.tasks.v1 import task_pb2
    from charai.worker.attempt import Attempt, AttemptContext

    media = MediaStore(await _bucket(js), js, BUCKET)
    task = task_pb2.Task(id="task_" + "c" * 32)
    attempt = Attempt(msg=None, task_id=task.id, attempt=attempt_number)  # type: ignore[arg-type]
    ctx = AttemptContext(attempt, task, None, None, media)  # type: ignore[arg-type]  # store_media only

    async def api_requests() -> int:
        return int((await js.account_info()).api.total)

    first = await api_requests()
    itself = await api_requests() - first  # what one account_info request adds
    before = await api_requests()
    ref = await ctx.store_media(b"RIFF....WAVE", "wav", "audio/wav")
    assert await api_requests() - before - itself == lookups
    assert await media.get(ref.key) == b"RIFF....WAVE"


@pytest.mark.parametrize("size", [0, 5, 128 * 1024, 300_000])
async def test_a_bounded_get_reads_what_either_put_wrote(js: Any, size: int) -> None:
    bucket = await _bucket(js)
    media = MediaStore(bucket, js, BUCKET, chunk_wait=30)
    data = os.urandom(size)
    await media.put(KEY, data, new=True)
    await bucket.put("reference", data)
    assert await media.get(KEY) == data
    assert await media.get("reference") == data
    assert await media.get("nothing-here") is None
    await media.delete(KEY)
    assert await media.get(KEY) is None


async def test_a_get_whose_chunks_are_gone_answers_none_and_ends_its_subscription(js: Any) -> None:
    """A download racing a delete: the meta message read, the chunks purged before they are
    read. nats-py's get waits for them forever; the media store gives up after ``chunk_wait``
    (no chunk will come: the wait is for a message that does not exist, not for time to pass)."""
    bucket = await _bucket(js)
    media = MediaStore(bucket, js, BUCKET, chunk_wait=0.5)
    await media.put(KEY, os.urandom(300_000), new=True)
    info = await bucket.get_info(KEY)
    await js.purge_stream(f"OBJ_{BUCKET}", subject=f"$O.{BUCKET}.C.{info.nuid}")
    subscriptions = len(js._nc._subs)
    assert await media.get(KEY) is None
    assert len(js._nc._subs) == subscriptions  # the chunks' subscription ended with the get


async def test_a_get_never_answers_none_for_an_object_whose_chunks_are_stored(js: Any) -> None:
    """Chunks that are stored but do not arrive in time (here: a wait far shorter than a round
    trip) are not taken for missing: the read either returns the object or raises
    MediaUnavailableError (503 at the gateway), never None (404), and ends its subscription."""
    bucket = await _bucket(js)
    data = os.urandom(300_000)
    await MediaStore(bucket, js, BUCKET).put(KEY, data, new=True)
    impatient = MediaStore(bucket, js, BUCKET, chunk_wait=1e-6)
    subscriptions = len(js._nc._subs)
    outcomes = set()
    for _ in range(20):
        try:
            got = await impatient.get(KEY)
        except MediaUnavailableError:
            outcomes.add("unavailable")
        else:
            assert got == data
            outcomes.add("read")
    assert "unavailable" in outcomes  # the short wait did run out
    assert len(js._nc._subs) == subscriptions


@pytest.mark.parametrize("size", [5, 300_000])
async def test_a_new_objects_messages_leave_before_any_acknowledgement_is_awaited(js: Any, size: int) -> None:
    """Chunks and meta message back to back (no round trip between them): when each is queued,
    none of the put's earlier publishes has been acknowledged yet; the object reads back whole."""
    from charai.core.natsconn import AckedPublisher

    bucket = await _bucket(js)
    media = MediaStore(bucket, js, BUCKET)
    settled_when_queued: list[int] = []
    futures: list[Any] = []

    class Watching(AckedPublisher):
        async def publish(self, subject: str, payload: bytes, headers: Any = None) -> Any:
            settled_when_queued.append(sum(f.done() for f in futures))
            futures.append(await super().publish(subject, payload, headers))
            return futures[-1]

    media._publisher = Watching.of(js)
    data = os.urandom(size)
    await media.put(KEY, data, new=True)
    assert settled_when_queued == [0] * (-(-size // (128 * 1024)) + 1)
    assert await media.get(KEY) == data


async def test_acked_publishes_are_stored_in_order_and_a_refused_one_settles_with_its_error(js: Any) -> None:
    """nats-py's publish_async never settles a refused publish (its reply handler raises the
    error instead of setting it); the AckedPublisher's futures settle either way."""
    from charai.core.natsconn import AckedPublisher

    await js.add_stream(name="ACKED", subjects=["acked.>"], max_bytes=4096, discard=api.DiscardPolicy.NEW)
    publisher = AckedPublisher.of(js)
    acks = [await publisher.publish(f"acked.{i}", b"x" * 10) for i in range(5)]
    too_big = await publisher.publish("acked.big", b"x" * 8192)
    nowhere = await publisher.publish("no.stream.here", b"x")
    async with asyncio.timeout(30):  # a deadline against a hang, not a timing
        assert [ack.seq for ack in await asyncio.gather(*acks)] == [1, 2, 3, 4, 5]
        with pytest.raises(nats.js.errors.APIError):
            await too_big
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await nowhere
    assert publisher._waiting == {}
