"""The store's webhook deliveries on both backends, on a ManualClock: written with their events,
one head per task and endpoint, claims and settles by the rules of the core, progress coalesced,
secrets rotated with a grace period, deletions cascade."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3

import pytest
from charai.core.clock import ManualClock
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store import webhooks
from charai.task_store.webhook_secrets import derive_secret
from charai.task_store.webhooks import WebhookConfig
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import timestamp_pb2

from tests.integration.conftest import Database, Recorded, opened
from tests.integration.store_requests import complete_req, tts_request

KEY = b"k" * 32
URL = "https://hooks.example.com/charai"
PENDING = task_service_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
DELIVERED = task_service_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED
FAILED = task_service_pb2.WEBHOOK_DELIVERY_STATUS_FAILED
CONFIG = WebhookConfig(
    signing_key=KEY,
    schedule=(0.0, 5.0, 60.0),
    disable_after=3,
    progress_interval_seconds=1.0,
    secret_grace_seconds=3600,
)


def hooked(*events: str) -> task_service_pb2.CreateTaskRequest:
    request = tts_request()
    request.webhook.CopyFrom(task_pb2.Webhook(url=URL, events=list(events)))
    return request


async def listed(rec: Recorded, task_id: str) -> list[task_service_pb2.WebhookDelivery]:
    page = await rec.store.webhooks.list_deliveries(
        "t1", task_service_pb2.ListWebhookDeliveriesRequest(task_id=task_id)
    )
    return sorted(page.deliveries, key=lambda d: d.sequence)


async def run_to_completion(rec: Recorded, task_id: str, *progress: int) -> None:
    await rec.store.claim(task_id, 1, "w")
    for value in progress:
        await rec.store.progress(task_id, 1, value, "generating")
    await rec.store.complete(complete_req(task_id, 1))


def settle(delivery_id: str, status: int, retry_after: float = -1.0) -> spb.SettleWebhookDeliveryRequest:
    return spb.SettleWebhookDeliveryRequest(
        delivery_id=delivery_id, sender_id="s1", http_status=status, retry_after_seconds=retry_after
    )


async def test_deliveries_leave_one_at_a_time_in_event_order(db: Database) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        task, _ = await rec.store.create("t1", hooked("started", "completed"))
        await run_to_completion(rec, task.id)
        started, completed = await listed(rec, task.id)
        assert (started.event_type, completed.event_type) == ("task.started", "task.completed")
        # Only the head is published; the next waits until it is settled for good.
        jobs = [r for r in await rec.store.pending_dispatches() if r.subject.endswith("webhook.deliver")]
        assert [spb.WebhookJob.FromString(r.payload).delivery_id for r in jobs] == [started.id]
        assert spb.WebhookJob.FromString(jobs[0].payload).host == "hooks.example.com"  # its receiver
        assert (await rec.store.webhooks.claim(completed.id, "s1")).outcome == spb.CLAIM_OUTCOME_DONE

        claim = await rec.store.webhooks.claim(started.id, "s1")
        assert claim.outcome == spb.CLAIM_OUTCOME_RUN and claim.url == URL and claim.attempt == 1
        assert claim.event.task.id == task.id and claim.secrets == [derive_secret(KEY, "t1", 1)]
        # Another sender must wait for the claim to end.
        assert (await rec.store.webhooks.claim(started.id, "s2")).outcome == spb.CLAIM_OUTCOME_DEFER

        answer, queued = await rec.store.webhooks.settle(settle(started.id, 503))
        assert answer.outcome == spb.SETTLE_OUTCOME_RETRY and 4.5 <= answer.retry_after_seconds <= 5.5
        assert queued == 0
        # Not due yet: deferred by what is left of the delay.
        assert (await rec.store.webhooks.claim(started.id, "s1")).outcome == spb.CLAIM_OUTCOME_DEFER
        rec.clock.advance(6)
        assert (await rec.store.webhooks.claim(started.id, "s1")).attempt == 2
        answer, queued = await rec.store.webhooks.settle(settle(started.id, 200))
        assert (answer.outcome, queued) == (spb.SETTLE_OUTCOME_DONE, 1)
        jobs = [r for r in await rec.store.pending_dispatches() if r.subject.endswith("webhook.deliver")]
        assert spb.WebhookJob.FromString(jobs[-1].payload).delivery_id == completed.id
        first, _ = await listed(rec, task.id)
        assert first.status == DELIVERED and [a.http_status for a in first.attempts] == [503, 200]


async def test_retry_after_is_a_lower_bound_and_the_schedule_ends(db: Database) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        task, _ = await rec.store.create("t1", hooked())
        await run_to_completion(rec, task.id)
        (delivery,) = await listed(rec, task.id)
        await rec.store.webhooks.claim(delivery.id, "s1")
        answer, _ = await rec.store.webhooks.settle(settle(delivery.id, 429, retry_after=30))
        assert answer.retry_after_seconds == 30
        for _ in range(2):
            rec.clock.advance(120)
            assert (await rec.store.webhooks.claim(delivery.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN
            answer, _ = await rec.store.webhooks.settle(settle(delivery.id, 500))
        assert answer.outcome == spb.SETTLE_OUTCOME_DONE  # three attempts: the schedule ran out
        (delivery,) = await listed(rec, task.id)
        assert delivery.status == FAILED and len(delivery.attempts) == 3


async def test_a_streak_disables_the_endpoint_and_redelivery_enables_it(db: Database) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        disabled: list[tuple[str, str]] = []
        rec.store.webhooks.on_disabled = lambda tenant, host: disabled.append((tenant, host))
        ids = []
        for _ in range(3):
            task, _ = await rec.store.create("t1", hooked())
            await run_to_completion(rec, task.id)
            (delivery,) = await listed(rec, task.id)
            await rec.store.webhooks.claim(delivery.id, "s1")
            await rec.store.webhooks.settle(settle(delivery.id, 400))  # final, counts in the streak
            ids.append(task.id)
        assert disabled == [("t1", "hooks.example.com")]  # once, on the third failure in a row
        later, _ = await rec.store.create("t1", hooked())
        await run_to_completion(rec, later.id)
        (skipped,) = await listed(rec, later.id)
        assert skipped.status == FAILED and not skipped.attempts  # disabled: never sent
        count, queued = await rec.store.webhooks.redeliver(
            "t1", task_service_pb2.RedeliverWebhookRequest(since=timestamp_pb2.Timestamp(seconds=0))
        )
        assert (count, queued) == (4, 4)
        (again,) = await listed(rec, later.id)
        assert again.status == PENDING
        assert (await rec.store.webhooks.claim(again.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN


async def test_a_post_in_flight_when_its_endpoint_is_disabled_is_recorded_and_its_2xx_delivers(
    db: Database,
) -> None:
    # Two deliveries are being posted by s2 when three other tasks' failures disable the
    # endpoint: that failed every pending delivery, these too, and dropped their answers (a 200
    # among them), so the listing showed them FAILED with no attempt.
    async with opened(db, webhooks=CONFIG) as rec:
        in_flight = []
        for _ in range(2):
            task, _ = await rec.store.create("t1", hooked())
            await run_to_completion(rec, task.id)
            (delivery,) = await listed(rec, task.id)
            assert (await rec.store.webhooks.claim(delivery.id, "s2")).outcome == spb.CLAIM_OUTCOME_RUN
            in_flight.append((task.id, delivery.id))
        for _ in range(3):
            task, _ = await rec.store.create("t1", hooked())
            await run_to_completion(rec, task.id)
            (delivery,) = await listed(rec, task.id)
            await rec.store.webhooks.claim(delivery.id, "s1")
            await rec.store.webhooks.settle(settle(delivery.id, 400))
        assert [(await listed(rec, t))[0].status for t, _ in in_flight] == [FAILED, FAILED]  # disabled
        answers = [200, 503]
        for (_, delivery_id), status in zip(in_flight, answers, strict=True):
            late = spb.SettleWebhookDeliveryRequest(
                delivery_id=delivery_id, sender_id="s2", http_status=status
            )
            for _ in range(2):  # a settle sent again (its answer lost) records nothing more
                response, queued = await rec.store.webhooks.settle(late)
                assert (response.outcome, queued) == (spb.SETTLE_OUTCOME_DONE, 0)
        found = [(await listed(rec, t))[0] for t, _ in in_flight]
        assert [(d.status, [a.http_status for a in d.attempts]) for d in found] == [
            (DELIVERED, [200]),
            (FAILED, [503]),  # the endpoint stays disabled: no retry
        ]


async def test_redelivering_a_delivery_being_posted_leaves_it_to_that_post(db: Database) -> None:
    # The redelivery took the claim away: the post's answer was dropped (one attempt listed for
    # two posts) and the delivery was posted again.
    async with opened(db, webhooks=CONFIG) as rec:
        task, _ = await rec.store.create("t1", hooked())
        await run_to_completion(rec, task.id)
        (delivery,) = await listed(rec, task.id)
        assert (await rec.store.webhooks.claim(delivery.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN
        request = task_service_pb2.RedeliverWebhookRequest(delivery_id=delivery.id)
        assert await rec.store.webhooks.redeliver("t1", request) == (1, 0)  # it is on its way
        await rec.store.webhooks.settle(settle(delivery.id, 200))
        (done,) = await listed(rec, task.id)
        assert (done.status, [a.http_status for a in done.attempts]) == (DELIVERED, [200])
        assert (await rec.store.webhooks.claim(delivery.id, "s2")).outcome == spb.CLAIM_OUTCOME_DONE
        # Once settled it is redelivered as any other: posted again.
        assert await rec.store.webhooks.redeliver("t1", request) == (1, 1)
        assert (await rec.store.webhooks.claim(delivery.id, "s2")).outcome == spb.CLAIM_OUTCOME_RUN


async def test_a_redelivery_queues_the_head_of_each_tasks_queue_once(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "_TASKS_PER_READ", 2)  # three tasks: two reads
    async with opened(db, webhooks=CONFIG) as rec:
        tasks = []
        for _ in range(3):  # each: started fails for good, then completed is skipped (disabled)
            task, _ = await rec.store.create("t1", hooked("started", "completed"))
            await run_to_completion(rec, task.id)
            started, _ = await listed(rec, task.id)
            await rec.store.webhooks.claim(started.id, "s1")
            await rec.store.webhooks.settle(settle(started.id, 400))
            tasks.append(task.id)
        other_request = hooked()
        other_request.webhook.url = "https://elsewhere.example.com/in"
        other, _ = await rec.store.create("t1", other_request)
        await run_to_completion(rec, other.id)
        (lone,) = await listed(rec, other.id)
        await rec.store.webhooks.claim(lone.id, "s1")
        await rec.store.webhooks.settle(settle(lone.id, 400))
        before = {(r.task_id, r.dispatch_gen) for r in await rec.store.pending_dispatches()}
        count, queued = await rec.store.webhooks.redeliver(
            "t1", task_service_pb2.RedeliverWebhookRequest(since=timestamp_pb2.Timestamp(seconds=0))
        )
        assert (count, queued) == (7, 4)  # every failed delivery; the head of each queue
        heads = [(await listed(rec, task_id))[0] for task_id in tasks]
        jobs = [r for r in await rec.store.pending_dispatches() if (r.task_id, r.dispatch_gen) not in before]
        queued_ids = sorted(spb.WebhookJob.FromString(r.payload).delivery_id for r in jobs)
        assert queued_ids == sorted([d.id for d in heads] + [lone.id])
        for task_id in tasks:
            started, completed = await listed(rec, task_id)
            assert (started.status, completed.status) == (PENDING, PENDING)
            assert (await rec.store.webhooks.claim(completed.id, "s1")).outcome == spb.CLAIM_OUTCOME_DONE
            assert (await rec.store.webhooks.claim(started.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN
        if db.kind == "sqlite":  # the heads are read by task id, not among every pending delivery
            with contextlib.closing(sqlite3.connect(db.url.removeprefix("sqlite:///"))) as conn:
                plan = conn.execute(
                    f"EXPLAIN QUERY PLAN {webhooks._HEADS.format(marks='?, ?')}", ("a", "b", 0)
                )
                assert "INDEX webhook_deliveries_queue (task_id=?)" in " ".join(str(r[3]) for r in plan)
            assert (await rec.store.webhooks.claim(completed.id, "s1")).outcome == spb.CLAIM_OUTCOME_DONE
            assert (await rec.store.webhooks.claim(started.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN


async def test_a_pending_progress_delivery_is_replaced_by_the_next_event(db: Database) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        task, _ = await rec.store.create("t1", hooked("progress", "completed"))
        await rec.store.claim(task.id, 1, "w")
        await rec.store.progress(task.id, 1, 30, "generating")
        await rec.store.progress(task.id, 1, 60, "generating")
        (progress,) = await listed(rec, task.id)
        assert progress.event_type == "task.progress"
        # Held for the coalescing interval, then sent with the latest state.
        assert (await rec.store.webhooks.claim(progress.id, "s1")).outcome == spb.CLAIM_OUTCOME_DEFER
        await rec.store.complete(complete_req(task.id, 1))
        (only,) = await listed(rec, task.id)
        assert only.event_type == "task.completed"  # the unsent progress gave way


async def test_progress_reported_more_often_than_the_interval_is_sent_once_each_interval(
    db: Database,
) -> None:
    # The interval counts from the first progress not yet sent: each report replaces the pending
    # delivery's state, not its time (it restarted the timer, so a task reporting every 0.5 s
    # got no progress delivery at all until it stopped reporting).
    async with opened(db, webhooks=CONFIG) as rec:  # progress_interval_seconds=1.0
        task, _ = await rec.store.create("t1", hooked("progress"))
        await rec.store.claim(task.id, 1, "w")
        start = rec.clock.time()
        for value in (20, 30, 40):
            await rec.store.progress(task.id, 1, value, "generating")
            rec.clock.advance(0.4)
        (pending,) = await listed(rec, task.id)
        assert pending.next_attempt_time.ToMicroseconds() / 1e6 == pytest.approx(start + 1.0, abs=0.01)
        assert pending.sequence == (await rec.events(task.id))[-1].sequence  # the newest state
        claim = await rec.store.webhooks.claim(pending.id, "s1")  # 1.2 s in: due
        assert claim.outcome == spb.CLAIM_OUTCOME_RUN and claim.event.task.progress == 40
        await rec.store.webhooks.settle(settle(pending.id, 200))
        await rec.store.progress(task.id, 1, 50, "generating")  # the next: one interval from now
        nxt = [d for d in await listed(rec, task.id) if d.status == PENDING]
        assert [d.next_attempt_time.ToMicroseconds() / 1e6 for d in nxt] == [
            pytest.approx(rec.clock.time() + 1.0, abs=0.01)
        ]


async def test_rotation_signs_with_both_secrets_until_the_grace_ends(db: Database) -> None:
    async with opened(db, webhooks=CONFIG, clock=ManualClock(tick=1e-6)) as rec:
        webhooks = rec.store.webhooks
        old = await webhooks.secrets.current("t1")
        assert old == derive_secret(KEY, "t1", 1) and old != await webhooks.secrets.current("t2")
        rotated = await webhooks.secrets.rotate("t1")
        assert rotated.secret == await webhooks.secrets.current("t1") != old
        task, _ = await rec.store.create("t1", hooked())
        await run_to_completion(rec, task.id)
        (delivery,) = await listed(rec, task.id)
        assert list((await webhooks.claim(delivery.id, "s1")).secrets) == [rotated.secret, old]
        await webhooks.settle(settle(delivery.id, 500))
        rec.clock.advance(3601)
        assert list((await webhooks.claim(delivery.id, "s1")).secrets) == [rotated.secret]


async def test_deleting_a_task_removes_its_deliveries(db: Database) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        task, _ = await rec.store.create("t1", hooked())
        await run_to_completion(rec, task.id)
        (delivery,) = await listed(rec, task.id)
        await rec.store.webhooks.claim(delivery.id, "s1")
        await rec.store.webhooks.settle(settle(delivery.id, 200))
        assert await rec.store.delete("t1", task.id)
        assert await listed(rec, task.id) == []
        assert await db.count_rows("webhook_attempts") == 0


@pytest.mark.parametrize("page_size", [1, 2])
async def test_listing_pages_newest_first(db: Database, page_size: int) -> None:
    async with opened(db, webhooks=CONFIG) as rec:
        for _ in range(3):
            task, _ = await rec.store.create("t1", hooked())
            await run_to_completion(rec, task.id)
        seen: list[str] = []
        token = ""
        while True:
            page = await rec.store.webhooks.list_deliveries(
                "t1", task_service_pb2.ListWebhookDeliveriesRequest(page_size=page_size, page_token=token)
            )
            seen += [d.id for d in page.deliveries]
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)) == 3
        other = await rec.store.webhooks.list_deliveries(
            "t2", task_service_pb2.ListWebhookDeliveriesRequest()
        )
        assert not other.deliveries  # tenants see only their own


async def test_a_listed_page_gives_each_delivery_its_own_attempts_in_order(db: Database) -> None:
    """The attempts of a page's deliveries are read together (one query) and handed back to each
    delivery in its own order: none lost, none given to another, on every page."""
    patient = dataclasses.replace(CONFIG, disable_after=100)  # the failures here disable nothing
    async with opened(db, webhooks=patient) as rec:
        expected: dict[str, list[int]] = {}
        for statuses in ([], [503], [503, 500], [200], [429, 503, 200]):
            task, _ = await rec.store.create("t1", hooked())
            await run_to_completion(rec, task.id)
            (delivery,) = await listed(rec, task.id)
            for status in statuses:
                assert (await rec.store.webhooks.claim(delivery.id, "s1")).outcome == spb.CLAIM_OUTCOME_RUN
                await rec.store.webhooks.settle(settle(delivery.id, status, retry_after=1))
                rec.clock.advance(120)
            expected[delivery.id] = statuses
            rec.clock.advance(1)

        for size in (500, 2):
            got: dict[str, list[int]] = {}
            request = task_service_pb2.ListWebhookDeliveriesRequest(page_size=size)
            while True:
                page = await rec.store.webhooks.list_deliveries("t1", request)
                for d in page.deliveries:
                    got[d.id] = [a.http_status for a in d.attempts]
                    times = [a.time.ToMicroseconds() for a in d.attempts]
                    assert times == sorted(times)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
            assert got == expected
