"""Two task_stores on one PostgreSQL database under a mixed load, as replicas run it: creates of
three tenants (images and voice lines in one unit, so some are held by fair share), releases of
held tasks, claims and completions (with usage) in batches, and cancels, all at once and spread
over both stores. Nothing may fail, and no transaction may deadlock: PostgreSQL notices a
deadlock only after ``deadlock_timeout`` (1 s), so each one costs its caller a second before the
retry, and a unit that deadlocks three times fails (a gateway's UNAVAILABLE).

Before the fixes this found (``UnitRunner._write_rows``: a ``write_each`` unit held the events
lock while taking its next operation's row locks; ``Backlog._lock_tenant``: one tenant's creates
held its image and voice rows in either order) this load failed: some unit deadlocked three
times over (``DeadlockDetectedError``), and the run took 10 s instead of 3. A longer probe of
the same load counted 30 to 54 deadlocks a run (48 of 54 waits on the events lock).
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest
from charai.core.domain.prices import PriceTable
from charai.core.errors import StaleAttemptError, TaskEndedError
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.backlog import FairConfig
from charai.task_store.store import TaskStore
from charai.task_store.usage import UsageConfig
from charai.tasks.v1 import task_pb2
from structlog.testing import capture_logs

from tests.integration.conftest import Database, opened
from tests.integration.store_requests import RUN, image_request, image_result, tts_request

IMAGE, TTS = task_pb2.TASK_TYPE_IMAGE_GENERATION, task_pb2.TASK_TYPE_TTS_GENERATION
TENANTS = ("t1", "t2", "t3")
ROUNDS = 40  # per creator: a single image, a single voice line and a pair, in a shuffled order


def usage(kind: int) -> task_pb2.Usage:
    if kind == IMAGE:
        return task_pb2.Usage(provider="zhipu", model="glm-image", calls=1, images=1, image_size="1024x1024")
    return task_pb2.Usage(provider="zhipu", model="glm-tts", calls=1, speech_characters=10, audio_seconds=1.0)


def completion(task_id: str, kind: int, attempt: int) -> spb.CompleteTaskRequest:
    request = spb.CompleteTaskRequest(task_id=task_id, attempt=attempt, usage=usage(kind))
    if kind == IMAGE:
        request.image_result.CopyFrom(image_result())
    else:
        request.tts_result.CopyFrom(task_pb2.TtsResult(audio_url="charai-media:a.wav"))
    return request


@pytest.mark.parametrize("db", ["postgres"], indirect=True)
async def test_two_replicas_under_a_mixed_load_never_deadlock(db: Database) -> None:
    done = collections.Counter[str]()
    failed: list[BaseException] = []
    made: dict[str, tuple[int, str]] = {}  # task id -> (type, tenant)
    creating = asyncio.Event()
    config: dict[str, Any] = {"fair": FairConfig(buffer=2), "usage": UsageConfig(prices=PriceTable())}
    async with opened(db, **config) as one, opened(db, one.clock, **config) as two:
        stores = (one.store, two.store)

        async def creator(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(ROUNDS):
                tenant = rnd.choice(TENANTS)
                batches = [[(image_request(), "")], [(tts_request(), "")]]
                batches.append([(image_request(), ""), (tts_request(), "")])
                rnd.shuffle(batches)
                for answer in await rnd.choice(stores).create_each(tenant, batches):
                    if isinstance(answer, BaseException):
                        failed.append(answer)
                        continue
                    for task, _ in answer:
                        made[task.id] = (int(task.type), tenant)
                        done["created"] += 1

        async def releaser(store: TaskStore) -> None:
            while creating.is_set():
                for kind in (IMAGE, TTS):
                    done["released"] += (await store.release_held(kind))[0]
                await asyncio.sleep(0)

        async def worker(seed: int) -> None:
            rnd = random.Random(seed)
            while creating.is_set():
                jobs = await one.store.pending_dispatches(limit=200)
                picked = rnd.sample(jobs, min(len(jobs), 8))
                claims = [
                    spb.ClaimTaskRequest(task_id=j.task_id, dispatch_gen=j.dispatch_gen, worker_id=f"w{seed}")
                    for j in picked
                ]
                answers = await rnd.choice(stores).worker_each(claims)
                ends = []
                for job, answer in zip(picked, answers, strict=True):
                    if isinstance(answer, BaseException):
                        failed.append(answer)
                    elif answer.outcome == RUN:  # type: ignore[union-attr]
                        ends.append(completion(job.task_id, made[job.task_id][0], answer.attempt))  # type: ignore[union-attr]
                rnd.shuffle(ends)
                if ends:
                    for answer in await rnd.choice(stores).worker_each(ends):
                        if isinstance(answer, (TaskEndedError, StaleAttemptError)):
                            done["refused"] += 1  # cancelled meanwhile: the worker's answer
                        elif isinstance(answer, BaseException):
                            failed.append(answer)
                        else:
                            done["completed"] += 1
                await asyncio.sleep(0)

        async def canceller(seed: int) -> None:
            rnd = random.Random(seed)
            while creating.is_set():
                if made:
                    task_id, (_, tenant) = rnd.choice(list(made.items()))
                    await rnd.choice(stores).cancel(tenant, task_id)
                    done["cancels"] += 1
                await asyncio.sleep(0)

        creating.set()
        with capture_logs() as lines:
            background = [
                *(asyncio.create_task(releaser(store)) for store in stores),
                *(asyncio.create_task(worker(100 + i)) for i in range(4)),
                asyncio.create_task(canceller(7)),
            ]
            try:
                await asyncio.gather(*(creator(i) for i in range(6)))
            finally:
                creating.clear()
                results = await asyncio.gather(*background, return_exceptions=True)
        failed += [r for r in results if isinstance(r, BaseException)]
        assert failed == []
        assert done["created"] == 6 * ROUNDS * 4
        # The load did what it is for: tasks were held and released, claimed, completed, cancelled.
        assert min(done["released"], done["completed"], done["cancels"]) > 0, done
        retried = [line for line in lines if line["event"] == "transaction_retried"]
        assert retried == [], retried
