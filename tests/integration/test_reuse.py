"""Identical requests reused (task_store): the reuse key at create, the twin at claim, and media
shared by two tasks surviving the removal of one — on both store backends, on a clock the test
moves, with a real JetStream object-store bucket for the media."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from charai.core import natsconn
from charai.core.domain.errors import ErrorKind
from charai.core.domain.lifecycle import TWIN_WAIT_MAX, TWIN_WAIT_MIN
from charai.core.media import MediaStore
from charai.core.topology import Topology
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.removal import remove_task
from charai.task_store.reuse import ReuseConfig, reuse_key
from charai.tasks.v1 import task_pb2, task_service_pb2

from tests.integration.conftest import Database, Recorded, opened
from tests.integration.store_requests import (
    CANCELLED,
    COMPLETED,
    DEFER,
    EV,
    QUEUED,
    RUN,
    fail_req,
    image_request,
    tts_request,
)

if TYPE_CHECKING:
    from tests.conftest import NatsServer

REUSED = spb.CLAIM_OUTCOME_REUSED
HOUR = 3600.0
REUSE = ReuseConfig(ttl_seconds=HOUR)


@pytest.fixture
async def media(nats_server: NatsServer) -> AsyncIterator[MediaStore]:
    nc = await nats.connect(nats_server.url)
    try:
        yield MediaStore(await natsconn.ensure_media_bucket(nc.jetstream(), Topology()))
    finally:
        await nc.close()


def speech(
    character: str = "char_001", text: str = "hello", **options: object
) -> task_service_pb2.CreateTaskRequest:
    """A TTS request; ``options`` set TtsPayload fields (voice_style, speed, reuse, ...)."""
    request = tts_request(character)
    request.tts.text = text
    for name, value in options.items():
        setattr(request.tts, name, value)
    return request


def seeded(seed: int | None, prompt: str = "a knight") -> task_service_pb2.CreateTaskRequest:
    request = image_request(prompt=prompt)
    if seed is not None:
        request.image.seed = seed
    return request


async def run_to_completion(
    rec: Recorded, request: task_service_pb2.CreateTaskRequest, tenant: str = "t1"
) -> task_pb2.Task:
    """A task created, claimed (it must RUN: a provider call) and completed with media of its own."""
    task, _ = await rec.store.create(tenant, request)
    claim = await rec.store.claim(task.id, 1, "w1")
    assert claim.outcome == RUN, claim
    done = spb.CompleteTaskRequest(task_id=task.id, attempt=claim.attempt)
    if request.HasField("tts"):
        done.tts_result.audio_url = f"charai-media:{task.id}.wav"
        done.tts_result.text = request.tts.text
        done.tts_result.duration_seconds = 1.5
    else:
        done.image_result.image_url = f"charai-media:{task.id}.png"
    return await rec.store.complete(done)


async def claim_outcome(
    rec: Recorded, request: task_service_pb2.CreateTaskRequest, tenant: str = "t1"
) -> int:
    task, _ = await rec.store.create(tenant, request)
    return int((await rec.store.claim(task.id, 1, "w2")).outcome)


async def test_an_identical_tts_request_completes_with_the_same_audio_and_no_run(db: Database) -> None:
    async with opened(db, reuse=REUSE) as rec:
        first = await run_to_completion(rec, speech("char_001"))
        # Another character, same line: the labels do not shape the audio.
        second, _ = await rec.store.create("t1", speech("char_002"))
        assert second.status == QUEUED  # decided at claim, not at create
        claim = await rec.store.claim(second.id, 1, "w2")
        assert (claim.outcome, claim.attempt) == (REUSED, 1)
        got = await rec.store.get("t1", second.id)
        assert (got.status, got.progress, got.stage) == (COMPLETED, 100, "completed")
        result = got.tts_result
        assert result.audio_url == first.tts_result.audio_url == f"charai-media:{first.id}.wav"
        assert (result.reused, result.reused_from_task_id) == (True, first.id)
        assert (result.text, result.duration_seconds) == ("hello", 1.5)
        assert not first.tts_result.reused
        # No provider call: metered as reused (GetUsage's `reused`), with no call, units or cost.
        usage = got.usage
        assert (usage.provider, usage.model) == (REUSE.tts_provider, REUSE.tts_model)
        assert (usage.reused, usage.calls, usage.speech_characters, usage.cost_usd) == (True, 0, 0, 0.0)
        events = await rec.events(second.id)
        assert [e.type for e in events] == [
            EV.TASK_EVENT_TYPE_QUEUED,
            EV.TASK_EVENT_TYPE_STARTED,
            EV.TASK_EVENT_TYPE_COMPLETED,
        ]
        assert events[-1].task.tts_result.reused and events[-1].task.progress == 100
        assert events[-1].task.usage == usage
        # The job's redelivery (the worker's ack was lost) is a no-op.
        assert (await rec.store.claim(second.id, 1, "w3")).outcome == spb.CLAIM_OUTCOME_DONE
        # A task that reused is reused in turn, naming the task whose call made the audio.
        third, _ = await rec.store.create("t1", speech("char_003"))
        assert (await rec.store.claim(third.id, 1, "w2")).outcome == REUSED
        assert (await rec.store.get("t1", third.id)).tts_result.reused_from_task_id == first.id
        report = await rec.store.get_usage("t1", task_service_pb2.GetUsageRequest())
        assert [(r.provider, r.reused, r.calls, r.cost_usd) for r in report.rows] == [
            (REUSE.tts_provider, 2, 0, 0.0)
        ]


async def test_a_claim_waits_for_a_running_twin_then_reuses_or_runs(db: Database) -> None:
    async with opened(db, reuse=REUSE, lease_seconds=30.0) as rec:
        running, _ = await rec.store.create("t1", speech())
        assert (await rec.store.claim(running.id, 1, "w1")).outcome == RUN
        waiting, _ = await rec.store.create("t1", speech())
        deferred = await rec.store.claim(waiting.id, 1, "w2")
        assert deferred.outcome == DEFER and TWIN_WAIT_MIN <= deferred.retry_after <= TWIN_WAIT_MAX
        assert [e.type for e in await rec.events(waiting.id)] == [EV.TASK_EVENT_TYPE_QUEUED]
        # The twin completes: the waiting one reuses it.
        done = spb.CompleteTaskRequest(task_id=running.id, attempt=1)
        done.tts_result.audio_url = "charai-media:x.wav"
        await rec.store.complete(done)
        assert (await rec.store.claim(waiting.id, 1, "w2")).outcome == REUSED

        # A twin that fails (for good) or is cancelled leaves the next claim to run normally.
        for end in ("fail", "cancel"):
            text = f"line that will {end}"
            first, _ = await rec.store.create("t1", speech(text=text))
            assert (await rec.store.claim(first.id, 1, "w1")).outcome == RUN
            second, _ = await rec.store.create("t1", speech(text=text))
            assert (await rec.store.claim(second.id, 1, "w2")).outcome == DEFER
            if end == "fail":
                await rec.store.fail(fail_req(first.id, 1, ErrorKind.CONTENT_REJECTED))
            else:
                assert (await rec.store.cancel("t1", first.id))[0].status == CANCELLED
            assert (await rec.store.claim(second.id, 1, "w2")).outcome == RUN

        # A twin whose worker was lost (lease expired) is not waited for.
        first, _ = await rec.store.create("t1", speech(text="lost worker"))
        assert (await rec.store.claim(first.id, 1, "w1")).outcome == RUN
        rec.clock.advance(31)
        second, _ = await rec.store.create("t1", speech(text="lost worker"))
        assert (await rec.store.claim(second.id, 1, "w2")).outcome == RUN


async def test_a_running_twin_behind_a_completion_past_the_ttl_is_still_waited_for(db: Database) -> None:
    # The twin lookup reads the key's newest COMPLETED task first; one past the TTL must not hide
    # a task of the key RUNNING under a live lease.
    async with opened(db, reuse=REUSE, lease_seconds=30.0) as rec:
        await run_to_completion(rec, speech(text="an old line"))
        rec.clock.advance(HOUR + 1)
        running, _ = await rec.store.create("t1", speech(text="an old line"))
        assert (await rec.store.claim(running.id, 1, "w1")).outcome == RUN
        waiting, _ = await rec.store.create("t1", speech(text="an old line"))
        assert (await rec.store.claim(waiting.id, 1, "w2")).outcome == DEFER
        # ... and once it has completed, its fresh result is reused.
        done = spb.CompleteTaskRequest(task_id=running.id, attempt=1)
        done.tts_result.audio_url = "charai-media:y.wav"
        await rec.store.complete(done)
        assert (await rec.store.claim(waiting.id, 1, "w2")).outcome == REUSED


async def test_only_identical_opted_in_requests_within_the_ttl_reuse(db: Database) -> None:
    async with opened(db, reuse=REUSE) as rec:
        await run_to_completion(rec, speech(voice_style="calm", speed=1.0))
        # Unset speed and volume are 1, an empty format is wav: the same audio.
        assert (
            await claim_outcome(rec, speech(voice_style="calm", volume=1.0, response_format="WAV")) == REUSED
        )
        assert await claim_outcome(rec, speech(voice_style="calm", reuse=True)) == REUSED
        for different in (
            speech(voice_style="calm", reuse=False),  # the per-request opt-out
            speech(voice_style="tongtong"),
            speech(voice_style="calm", speed=1.5),
            speech(voice_style="calm", volume=2.0),
            speech(voice_style="calm", response_format="mp3"),
            speech(voice_style="calm", text="hello!"),
        ):
            assert await claim_outcome(rec, different) == RUN, different.tts
        assert await claim_outcome(rec, speech(voice_style="calm"), tenant="t2") == RUN  # tenants apart

        # Images: only with a seed, and only the same seed.
        await run_to_completion(rec, seeded(None))
        assert await claim_outcome(rec, seeded(None)) == RUN
        await run_to_completion(rec, seeded(7))
        assert await claim_outcome(rec, seeded(7)) == REUSED
        assert await claim_outcome(rec, seeded(8)) == RUN
        assert await claim_outcome(rec, seeded(7, prompt="another knight")) == RUN

        # The TTL runs from the latest completion of the line.
        await run_to_completion(rec, speech(text="ttl line"))
        rec.clock.advance(HOUR - 5)
        assert await claim_outcome(rec, speech(text="ttl line")) == REUSED
        rec.clock.advance(HOUR + 1)
        assert await claim_outcome(rec, speech(text="ttl line")) == RUN


async def test_reuse_off_stores_no_key_and_never_reuses(db: Database) -> None:
    async with opened(db) as rec:  # StoreConfig's default: ttl 0
        first = await run_to_completion(rec, speech())
        assert await claim_outcome(rec, speech()) == RUN
        key = await rec.store.backend.read(
            lambda tx: tx.fetchval("SELECT reuse_key FROM tasks WHERE id = ?", first.id)
        )
        assert key is None


def test_the_key_follows_provider_model_and_tenant() -> None:
    task = task_pb2.Task(type=task_pb2.TASK_TYPE_TTS_GENERATION, tts=speech().tts)
    key = reuse_key("t1", task, REUSE)
    assert key is not None and len(key) == 64
    assert reuse_key("t1", task, REUSE) == key
    assert reuse_key("t2", task, REUSE) != key
    assert reuse_key("t1", task, ReuseConfig(ttl_seconds=HOUR, tts_model="glm-tts-2")) != key
    assert reuse_key("t1", task, ReuseConfig(ttl_seconds=HOUR, tts_provider="openai")) != key
    assert reuse_key("t1", task, ReuseConfig(ttl_seconds=0)) is None


async def test_two_identical_claims_at_once_run_one_provider_call(db: Database) -> None:
    # PostgreSQL: concurrent transactions; the key's lock makes the second see the first running.
    async with opened(db, reuse=REUSE) as rec:
        for n in range(8):
            text = f"raced line {n}"
            a, _ = await rec.store.create("t1", speech(text=text))
            b, _ = await rec.store.create("t1", speech(text=text))
            claims = await asyncio.gather(rec.store.claim(a.id, 1, "w1"), rec.store.claim(b.id, 1, "w2"))
            assert sorted(c.outcome for c in claims) == [RUN, DEFER], claims


async def test_removing_one_of_two_tasks_sharing_media_keeps_it_for_the_other(
    db: Database, media: MediaStore
) -> None:
    async with opened(db, reuse=REUSE) as rec:
        first = await run_to_completion(rec, speech())
        key = f"{first.id}.wav"
        await media.put(key, b"the audio")
        second, _ = await rec.store.create("t1", speech())
        assert (await rec.store.claim(second.id, 1, "w2")).outcome == REUSED

        assert await remove_task(rec.store, media, "t1", first.id)
        assert await media.get(key) == b"the audio"  # the second task still points to it
        # A new identical request reuses the remaining task, not the removed one.
        third, _ = await rec.store.create("t1", speech())
        assert (await rec.store.claim(third.id, 1, "w3")).outcome == REUSED
        assert (await rec.store.get("t1", third.id)).tts_result.audio_url == f"charai-media:{key}"

        assert await remove_task(rec.store, media, "t1", second.id)
        assert await media.get(key) == b"the audio"  # the third still does
        assert await remove_task(rec.store, media, "t1", third.id)
        assert await media.get(key) is None  # the last one took it


async def test_a_detached_task_is_no_twin_and_a_repeated_removal_still_sees_the_sharers(
    db: Database, media: MediaStore
) -> None:
    async with opened(db, reuse=REUSE) as rec:
        first = await run_to_completion(rec, speech())
        key = f"{first.id}.wav"
        await media.put(key, b"the audio")
        second, _ = await rec.store.create("t1", speech())
        assert (await rec.store.claim(second.id, 1, "w2")).outcome == REUSED
        # A removal of the first that stopped after detaching it (a crash before its media and
        # rows went): no claim copies its result any more, and a removal again still keeps the
        # media the second uses.
        assert await rec.store.shared_media("t1", first.id) == frozenset({key})
        assert await rec.store.shared_media("t1", first.id) == frozenset({key})
        assert await rec.store.shared_media("t1", second.id) == frozenset()
        third, _ = await rec.store.create("t1", speech())
        assert (await rec.store.claim(third.id, 1, "w3")).outcome == RUN  # both detached
        assert await remove_task(rec.store, media, "t1", first.id)
        assert await media.get(key) is None  # neither sharer is left attached: it goes
