"""Two task_stores on one PostgreSQL database under a mixed load, as replicas run it: creates of
three tenants (images and voice lines in one unit, so some are held by fair share), releases of
held tasks, relays claiming and marking outbox rows, workers' batches of claims, progress
reports, completions and failures (with usage), and users' cancels, deletes and re-runs with
the sweeper's re-dispatch, all at once and spread over both stores. Nothing may fail but what a
real command would be refused, and no transaction may deadlock: PostgreSQL notices a deadlock
only after ``deadlock_timeout`` (1 s), so each one costs its caller a second before the retry,
and a unit that deadlocks three times fails (a gateway's UNAVAILABLE).

What this load found (BENCHMARKS.md, "thirty-second pass"), each fixed:

- a ``write_each`` unit held the events lock while taking its next operation's row locks
  (``UnitRunner._write_rows``); one tenant's creates held its image and voice rows in either
  order (``Backlog._lock_tenant``). Without these fixes the load fails every run
  (``DeadlockDetectedError``; 10 s instead of 3), and a longer probe counted 30 to 54
  deadlocks a run, 48 of 54 waits on the events lock;
- a release locked the task rows it unholds in the order its plan read them, not in id order
  (``Backlog._unhold``), and a relay marking a job locked its outbox row before its task's
  (``Outbox._mark``). Rarer: without these two, 2 of 6 runs failed.
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest
from charai.core.domain.errors import ErrorKind
from charai.core.domain.prices import PriceTable
from charai.core.errors import (
    NotFailedError,
    NotFoundError,
    StaleAttemptError,
    TaskEndedError,
    TaskNotFinishedError,
)
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


#: What a command may be refused with in this load, as a real one would be: its task was
#: cancelled, deleted or run again meanwhile, or is not in the state the command needs.
REFUSALS = (TaskEndedError, StaleAttemptError, NotFoundError, NotFailedError, TaskNotFinishedError)


def failure(task_id: str, kind: int, attempt: int) -> spb.FailTaskRequest:
    error = task_pb2.TaskError(code=int(ErrorKind.PROVIDER_UNAVAILABLE), message="provider away")  # type: ignore[arg-type]
    return spb.FailTaskRequest(task_id=task_id, attempt=attempt, error=error, usage=usage(kind))


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

        async def relay(store: TaskStore, owner: str) -> None:
            """Publishes nothing, but claims and marks outbox rows as a relay does."""
            while creating.is_set():
                rows = await store.claim_dispatches(owner, 50)
                if rows:
                    await store.mark_dispatched([(row, 1 + i) for i, row in enumerate(rows)])
                    done["marked"] += len(rows)
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
                # Each started job reports progress, then completes or fails (retried later),
                # all in one batch as a worker's calls coalesce.
                ends: list[Any] = []
                for job, answer in zip(picked, answers, strict=True):
                    if isinstance(answer, BaseException):
                        failed.append(answer)
                    elif answer.outcome == RUN:  # type: ignore[union-attr]
                        kind, attempt = made[job.task_id][0], answer.attempt  # type: ignore[union-attr]
                        ends.append(
                            spb.ReportProgressRequest(task_id=job.task_id, attempt=attempt, progress=50)
                        )
                        end = completion if rnd.random() < 0.7 else failure
                        ends.append(end(job.task_id, kind, attempt))
                if ends:
                    for answer in await rnd.choice(stores).worker_each(ends):
                        if isinstance(answer, REFUSALS):
                            done["refused"] += 1  # cancelled or deleted meanwhile
                        elif isinstance(answer, BaseException):
                            failed.append(answer)
                        else:
                            done["reported or ended"] += 1
                await asyncio.sleep(0)

        async def user(seed: int) -> None:
            """Cancels, deletes, runs failed tasks again; and the sweeper's re-dispatch."""
            rnd = random.Random(seed)
            while creating.is_set():
                if made:
                    task_id, (_, tenant) = rnd.choice(list(made.items()))
                    store, pick = rnd.choice(stores), rnd.random()
                    try:
                        if pick < 0.5:
                            await store.cancel(tenant, task_id)
                            done["cancels"] += 1
                        elif pick < 0.7:
                            await store.retry(tenant, task_id)
                        elif pick < 0.85:
                            if await store.delete(tenant, task_id):
                                made.pop(task_id, None)
                                done["deleted"] += 1
                        else:
                            await store.redispatch(task_id, 1)
                    except REFUSALS:
                        done["refused"] += 1
                await asyncio.sleep(0)

        creating.set()
        with capture_logs() as lines:
            background = [
                *(asyncio.create_task(releaser(store)) for store in stores),
                *(asyncio.create_task(relay(store, f"relay-{i}")) for i, store in enumerate(stores)),
                *(asyncio.create_task(worker(100 + i)) for i in range(4)),
                *(asyncio.create_task(user(i)) for i in (7, 8)),
            ]
            try:
                await asyncio.gather(*(creator(i) for i in range(6)))
            finally:
                creating.clear()
                results = await asyncio.gather(*background, return_exceptions=True)
        failed += [r for r in results if isinstance(r, BaseException)]
        assert failed == []
        assert done["created"] == 6 * ROUNDS * 4
        # The load did what it is for: every kind of command ran.
        kinds = ("released", "marked", "reported or ended", "cancels", "deleted", "refused")
        assert min(done[k] for k in kinds) > 0, done
        retried = [line for line in lines if line["event"] == "transaction_retried"]
        assert retried == [], retried
