"""A task of each type goes through all four services and ends with real media behind its URL."""

from __future__ import annotations

import io
import struct
import urllib.error
import urllib.request
import wave

from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2


async def collect(client: CharaiClient, task_id: str) -> list[task_pb2.TaskEvent]:
    return [event async for event in client.watch(task_id)]


async def test_image_task_completes_with_a_png(client: CharaiClient) -> None:
    task = await client.create_image(
        "char_e2e_img", "a knight, front view", resolution="1088x1472", character_name="K"
    )
    assert task.status == task_pb2.TASK_STATUS_QUEUED
    assert task.progress == 0
    assert task.metadata["characterId"] == "char_e2e_img"
    events = await collect(client, task.id)
    final = events[-1].task
    # The end, live; or, on a busy machine, a snapshot taken after the task had completed.
    assert events[-1].type in (task_pb2.TASK_EVENT_TYPE_COMPLETED, task_pb2.TASK_EVENT_TYPE_SNAPSHOT)
    assert final.status == task_pb2.TASK_STATUS_COMPLETED
    assert final.progress == 100
    result = final.image_result
    assert (result.width, result.height) == (1088, 1472)
    assert result.resolution == "1088x1472"
    assert result.content_type == "image/png"
    with urllib.request.urlopen(result.image_url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        data = response.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", data[16:24]) == (1088, 1472)
    assert len(data) == result.size_bytes


async def test_progress_events_arrive_in_order_and_reach_100(client: CharaiClient) -> None:
    task = await client.create_image("char_e2e_prog", "a mage [[latency:1.2]]", resolution="1024x1024")
    await collect(client, task.id)
    # The whole log (a fresh watch starts from a snapshot, which may already be past 10 %).
    events = [e async for e in client.watch(task.id, after_sequence=1)]
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    progress = [e.task.progress for e in events]
    assert progress == sorted(progress), progress
    assert progress[-1] == 100
    assert 10 in progress and 90 in progress
    assert any(20 <= p <= 80 for p in progress)
    assert events[-1].type == task_pb2.TASK_EVENT_TYPE_COMPLETED
    assert task_pb2.TASK_EVENT_TYPE_STARTED in [e.type for e in events]


async def test_tts_task_completes_with_a_wav(client: CharaiClient) -> None:
    task = await client.create_tts("char_e2e_tts", "Hello there, traveller.", voice_style="tongtong")
    events = await collect(client, task.id)
    final = events[-1].task
    assert final.status == task_pb2.TASK_STATUS_COMPLETED, final.error
    result = final.tts_result
    assert result.content_type == "audio/wav"
    with urllib.request.urlopen(result.audio_url, timeout=10) as response:
        data = response.read()
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getframerate() == 24000
        assert wav.getnchannels() == 1
        seconds = wav.getnframes() / wav.getframerate()
    assert abs(seconds - result.duration_seconds) < 0.01
    assert seconds > 0.3


async def test_media_supports_range_requests(client: CharaiClient, stack: Stack) -> None:
    task = await client.create_tts("char_e2e_range", "Seek me.", voice_style="tongtong")
    final = [e async for e in client.watch(task.id)][-1].task
    request = urllib.request.Request(final.tts_result.audio_url, headers={"Range": "bytes=0-11"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"].startswith("bytes 0-11/")
        assert response.read()[:4] == b"RIFF"
    request = urllib.request.Request(final.tts_result.audio_url, headers={"Range": "bytes=-4"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert len(response.read()) == 4
    # HEAD: the length a GET would send, and no body (it had Content-Length 0).
    with urllib.request.urlopen(final.tts_result.audio_url, timeout=10) as response:
        size = len(response.read())
    for headers, status, length in (({}, 200, size), ({"Range": "bytes=0-11"}, 206, 12)):
        request = urllib.request.Request(final.tts_result.audio_url, method="HEAD", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert (response.status, int(response.headers["Content-Length"])) == (status, length)
            assert response.read() == b""


async def test_a_download_whose_chunks_are_gone_answers_404(client: CharaiClient, stack: Stack) -> None:
    """The object's description is there, its chunks are not (what a download sees when a delete
    purges them between the two reads): the download answers 404, it does not wait forever."""
    import nats
    from charai.core.topology import Topology

    task = await client.create_tts("char_e2e_gone", "Gone before it was read.", voice_style="tongtong")
    final = [e async for e in client.watch(task.id)][-1].task
    assert final.status == task_pb2.TASK_STATUS_COMPLETED, final.error
    bucket_name = Topology().media_bucket
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        info = await (await js.object_store(bucket_name)).get_info(f"{task.id}.wav")
        await js.purge_stream(f"OBJ_{bucket_name}", subject=f"$O.{bucket_name}.C.{info.nuid}")
    finally:
        await nc.close()
    try:
        with urllib.request.urlopen(final.tts_result.audio_url, timeout=60):
            raise AssertionError("a download of an object without its chunks answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


async def test_watching_a_finished_task_from_its_last_event_ends_at_once(client: CharaiClient) -> None:
    # The gateway answers a resume after the last event with nothing; the client took that for
    # a dropped stream and resumed until it gave up (31 tries, ~55 s), then raised.
    task = await client.create_tts("char_e2e_after_end", "Over already.", voice_style="tongtong")
    events = [e async for e in client.watch(task.id)]
    assert events[-1].task.status == task_pb2.TASK_STATUS_COMPLETED
    before = client.reconnects
    assert [e async for e in client.watch(task.id, after_sequence=events[-1].sequence)] == []
    rest = [e.sequence async for e in client.watch(task.id, after_sequence=events[-2].sequence)]
    assert rest == [events[-1].sequence]  # from an earlier event: the rest, as before
    assert client.reconnects == before
