"""An asyncio client for TaskService that resumes dropped watch streams without gaps."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from charai.taskapi import TERMINAL_STATUSES, error_details, is_final
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

_RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


#: The largest message the client takes (the gateway sends up to 8 MiB).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

#: What the watches ask for (``max_events_per_message``): a stream that fell behind sends what it
#: has queued in one message, which the watches unpack and still yield one event at a time.
EVENTS_PER_MESSAGE = 256


def _events(
    response: task_service_pb2.WatchTaskResponse | task_service_pb2.WatchTasksResponse,
) -> Sequence[task_pb2.TaskEvent]:
    """A stream message's events: ``events`` when set (several at once), else ``event``."""
    return response.events or (response.event,)


class CharaiError(Exception):
    """A failed call, with the gRPC code and the names of any bad fields."""

    def __init__(
        self, code: grpc.StatusCode, message: str, fields: list[tuple[str, str]] | None = None
    ) -> None:
        self.code = code
        self.message = message
        self.fields = fields or []
        detail = "; ".join(f"{f}: {d}" for f, d in self.fields)
        super().__init__(f"{code.name}: {detail or message}")

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> CharaiError:
        fields = list(error_details(exc).field_violations)
        return cls(exc.code(), exc.details() or "", fields)


class WatchResumeError(Exception):
    """The stream could not be resumed within the reconnect budget."""


ReconnectHook = Callable[[int, str, int], object]
"""Called by ``watch`` / ``watch_tasks`` before each resume attempt with the attempt number (1 for
the first retry after a drop), why the stream dropped, and the sequence it resumes after; lets a
UI say "reconnecting" instead of looking frozen."""


class CharaiClient:
    """``async with CharaiClient("127.0.0.1:50051") as c: task = await c.create_image(...)``"""

    def __init__(
        self, target: str, token: str = "", *, reconnect_attempts: int = 30, rpc_timeout: float = 30.0
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # What the gateway may send (8 MiB; a ListTasks page stops before 3 MiB of
                # tasks, a BatchCreateTasks answer of 100 large tasks is ~3.6 MB).
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ],
        )
        self._stub = task_service_pb2_grpc.TaskServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._reconnect_attempts = reconnect_attempts
        self._rpc_timeout = rpc_timeout
        # Resume attempts made by watch / watch_tasks over this client's life (for UIs and tests).
        self.reconnects = 0

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> CharaiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=timeout or self._rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            raise CharaiError.from_rpc(exc) from None

    async def create(self, request: task_service_pb2.CreateTaskRequest) -> task_pb2.Task:
        response = await self._call(self._stub.CreateTask, request)
        return response.task  # type: ignore[no-any-return]

    async def create_many(
        self, requests: Sequence[task_service_pb2.CreateTaskRequest]
    ) -> list[task_pb2.Task]:
        """BatchCreateTasks: up to 100 tasks in one call, all or none, answered in order (e.g. a
        character's views and a voice line). Give each a ``request_id`` to make retries safe."""
        batch = task_service_pb2.BatchCreateTasksRequest(requests=list(requests))
        response = await self._call(self._stub.BatchCreateTasks, batch)
        return list(response.tasks)

    async def create_image(
        self,
        character_id: str,
        prompt: str,
        *,
        resolution: str = "",
        view_type: str = "front",
        character_name: str = "",
        costume_id: str = "",
        metadata: Mapping[str, str] | None = None,
        priority: int = task_pb2.PRIORITY_NORMAL,
        request_id: str = "",
        webhook: task_pb2.Webhook | None = None,
        quality: str = "",
        output_format: str = "",
        seed: int | None = None,
    ) -> task_pb2.Task:
        """``seed``: makes the request repeatable, so an identical one (same seed) reuses its image."""
        payload = task_pb2.ImagePayload(
            character_id=character_id,
            character_name=character_name,
            prompt=prompt,
            resolution=resolution,
            view_type=view_type,
            costume_id=costume_id,
            quality=quality,
            output_format=output_format,
            callback=task_pb2.Callback(
                type="character_costume" if costume_id else "character_view",
                character_id=character_id,
                view_type=view_type,
                costume_id=costume_id,
            ),
        )
        if seed is not None:
            payload.seed = seed
        return await self.create(
            task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
                priority=priority,  # type: ignore[arg-type]
                image=payload,
                metadata=dict(metadata or {}),
                request_id=request_id,
                webhook=webhook,
            )
        )

    async def create_tts(
        self,
        character_id: str,
        text: str,
        *,
        voice_style: str = "tongtong",
        character_name: str = "",
        response_format: str = "",
        speed: float | None = None,
        volume: float | None = None,
        metadata: Mapping[str, str] | None = None,
        priority: int = task_pb2.PRIORITY_NORMAL,
        request_id: str = "",
        webhook: task_pb2.Webhook | None = None,
        reuse: bool | None = None,
    ) -> task_pb2.Task:
        """``reuse=False``: call the provider even when an identical request's audio could be reused."""
        payload = task_pb2.TtsPayload(
            character_id=character_id,
            character_name=character_name,
            text=text,
            voice_style=voice_style,
            response_format=response_format,
            callback=task_pb2.Callback(type="character_voice", character_id=character_id),
        )
        if speed is not None:
            payload.speed = speed
        if volume is not None:
            payload.volume = volume
        if reuse is not None:
            payload.reuse = reuse
        return await self.create(
            task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                priority=priority,  # type: ignore[arg-type]
                tts=payload,
                metadata=dict(metadata or {}),
                request_id=request_id,
                webhook=webhook,
            )
        )

    async def get(self, task_id: str) -> task_pb2.Task:
        response = await self._call(self._stub.GetTask, task_service_pb2.GetTaskRequest(id=task_id))
        return response.task  # type: ignore[no-any-return]

    async def cancel(self, task_id: str) -> task_pb2.Task:
        response = await self._call(self._stub.CancelTask, task_service_pb2.CancelTaskRequest(id=task_id))
        return response.task  # type: ignore[no-any-return]

    async def retry(self, task_id: str) -> task_pb2.Task:
        """Re-runs a FAILED task (QUEUED again, a fresh attempt budget); FAILED_PRECONDITION otherwise."""
        response = await self._call(self._stub.RetryTask, task_service_pb2.RetryTaskRequest(id=task_id))
        return response.task  # type: ignore[no-any-return]

    # -- webhooks (tenant key only) -------------------------------------------------------------
    async def webhook_secret(self) -> str:
        """The tenant's current webhook signing secret (``whsec_…``)."""
        response = await self._call(self._stub.GetWebhookSecret, task_service_pb2.GetWebhookSecretRequest())
        return str(response.secret)

    async def rotate_webhook_secret(self) -> task_service_pb2.RotateWebhookSecretResponse:
        """A new secret; the old one keeps signing beside it for the grace period."""
        request = task_service_pb2.RotateWebhookSecretRequest()
        return await self._call(self._stub.RotateWebhookSecret, request)  # type: ignore[no-any-return]

    async def webhook_deliveries(
        self, *, task_id: str = "", url: str = "", status: int = 0, limit: int = 50
    ) -> list[task_service_pb2.WebhookDelivery]:
        """Deliveries, newest first, each with its attempts (at most ``limit``)."""
        found: list[task_service_pb2.WebhookDelivery] = []
        token = ""
        while len(found) < limit:
            request = task_service_pb2.ListWebhookDeliveriesRequest(
                task_id=task_id,
                url=url,
                status=status,  # type: ignore[arg-type]
                page_size=min(500, limit - len(found)),
                page_token=token,
            )
            page = await self._call(self._stub.ListWebhookDeliveries, request)
            found.extend(page.deliveries)
            token = page.next_page_token
            if not token:
                break
        return found

    async def redeliver_webhook(self, delivery_id: str = "", since: float | None = None) -> int:
        """Sends one delivery again, or every failed one since ``since`` (Unix seconds)."""
        request = task_service_pb2.RedeliverWebhookRequest(delivery_id=delivery_id)
        if since is not None:
            request.since.FromNanoseconds(int(since * 1e9))
        response = await self._call(self._stub.RedeliverWebhook, request)
        return int(response.redelivered)

    async def queue_stats(self) -> list[task_service_pb2.LaneStats]:
        """Depth, in-flight, throughput and median wait of every lane (type x priority)."""
        return list((await self.operations_stats()).lanes)

    async def operations_stats(self) -> task_service_pb2.GetQueueStatsResponse:
        """The whole GetQueueStats answer: the lanes, and every provider credential's shared
        limit and breaker (``providers``)."""
        return await self._call(self._stub.GetQueueStats, task_service_pb2.GetQueueStatsRequest())  # type: ignore[no-any-return]

    async def usage(
        self, *, tenant: str = "", all_tenants: bool = False, start_day: str = "", end_day: str = ""
    ) -> task_service_pb2.GetUsageResponse:
        """Metered usage by tenant, provider, model and day (UTC, ``YYYY-MM-DD``, inclusive;
        default: this month so far) with the tenant's budgets, every page read. Another
        ``tenant`` or ``all_tenants`` needs an operator tenant's key."""
        request = task_service_pb2.GetUsageRequest(
            tenant=tenant, all_tenants=all_tenants, start_day=start_day, end_day=end_day
        )
        answer = task_service_pb2.GetUsageResponse()
        while True:
            page = await self._call(self._stub.GetUsage, request)
            answer.rows.extend(page.rows)
            if not page.next_page_token:
                answer.budgets.extend(page.budgets)
                answer.start_day, answer.end_day = page.start_day, page.end_day
                return answer
            request.page_token = page.next_page_token

    async def list(
        self,
        metadata: Mapping[str, str] | None = None,
        *,
        task_type: int = 0,
        status: int = 0,
        page_size: int = 0,
    ) -> AsyncIterator[task_pb2.Task]:
        token = ""
        while True:
            request = task_service_pb2.ListTasksRequest(
                metadata=dict(metadata or {}),
                type=task_type,  # type: ignore[arg-type]
                status=status,  # type: ignore[arg-type]
                page_size=page_size,
                page_token=token,
            )
            response = await self._call(self._stub.ListTasks, request)
            for task in response.tasks:
                yield task
            token = response.next_page_token
            if not token:
                return

    async def watch(
        self, task_id: str, after_sequence: int = 0, *, on_reconnect: ReconnectHook | None = None
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """Every event of one task until its terminal event; a dropped stream is resumed from the
        last sequence seen, so no event is lost or repeated. Heartbeats are not yielded."""
        last = after_sequence
        failures = 0
        settled = False  # the task had ended when a stream came back empty: one more look
        while True:
            request = task_service_pb2.WatchTaskRequest(
                id=task_id, after_sequence=last, max_events_per_message=EVENTS_PER_MESSAGE
            )
            call = self._stub.WatchTask(request, metadata=self._metadata)
            received = False
            try:
                async for response in call:
                    received = True
                    failures = 0
                    for event in _events(response):
                        if event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                            continue
                        if event.sequence:
                            last = max(last, event.sequence)
                        yield event
                        if is_final(event):
                            return
                if not received and (settled or await self._has_ended(task_id)):
                    # Nothing after the cursor: the task ended at or before it (a resume after
                    # its last event), which the gateway answers with nothing; resuming again
                    # would never end. A stream opened once it had ended sends what came after
                    # the cursor, then ends: the second empty one settles it.
                    if settled:
                        return
                    settled = True
                    continue
                # The stream ended without the terminal event (e.g. the gateway is draining): resume.
                failures += 1
                reason = "the stream ended before the task did"
                give_up = f"gave up resuming after {failures} attempts"
                await self._resume(failures, reason, last, on_reconnect, give_up)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE:
                    raise CharaiError.from_rpc(exc) from None
                failures += 1
                reason = f"{exc.code().name}: {exc.details()}"
                give_up = f"gave up resuming after {failures} attempts: {exc.details()}"
                await self._resume(failures, reason, last, on_reconnect, give_up)
            finally:
                call.cancel()

    async def _has_ended(self, task_id: str) -> bool:
        return (await self.get(task_id)).status in TERMINAL_STATUSES

    async def watch_tasks(
        self,
        metadata: Mapping[str, str],
        *,
        task_type: int = 0,
        after_sequence: int = 0,
        on_reconnect: ReconnectHook | None = None,
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """Every event of tasks matching ``metadata``, resumed after drops; never ends by itself.

        The stream is ordered per task, not across tasks (a late event of one task may follow a
        newer event of another), so a resume starts from the *floor* the server reports in its
        heartbeats (every event up to it was delivered) and drops what this client already saw.
        """
        floor = after_sequence
        seen: dict[str, int] = {}
        failures = 0
        while True:
            call = self._stub.WatchTasks(
                task_service_pb2.WatchTasksRequest(
                    metadata=dict(metadata),
                    type=task_type,  # type: ignore[arg-type]
                    after_sequence=floor,
                    max_events_per_message=EVENTS_PER_MESSAGE,
                ),
                metadata=self._metadata,
            )
            try:
                async for response in call:
                    failures = 0
                    for event in _events(response):
                        if event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                            floor = max(floor, event.sequence)
                            seen = {t: s for t, s in seen.items() if s > floor}
                            continue
                        if event.sequence <= max(floor, seen.get(event.task.id, 0)):
                            continue  # replayed after a resume: already yielded
                        seen[event.task.id] = event.sequence
                        yield event
                reason = "the stream ended (the gateway may be draining)"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE:
                    raise CharaiError.from_rpc(exc) from None
                reason = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            # A clean end and a dropped connection are both resumed, with the same backoff.
            failures += 1
            give_up = f"gave up resuming after {failures} attempts: {reason}"
            await self._resume(failures, reason, floor, on_reconnect, give_up)

    async def _resume(
        self, attempt: int, reason: str, after: int, hook: ReconnectHook | None, give_up: str
    ) -> None:
        """Before resume ``attempt`` of a dropped stream: tells ``hook`` and backs off, or raises
        WatchResumeError(``give_up``) once the reconnect budget is spent."""
        if attempt > self._reconnect_attempts:
            raise WatchResumeError(give_up) from None
        self.reconnects += 1
        if hook is not None:
            hook(attempt, reason, after)
        await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    @staticmethod
    async def download(url: str) -> bytes:
        """Fetches a media URL of a completed task (signed: no token needed)."""

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own http(s) URL
                return bytes(response.read())

        return await asyncio.to_thread(fetch)
