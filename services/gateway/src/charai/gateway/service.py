"""The public TaskService: authenticate, validate, forward to task_store, stream events.

Every task leaving the gateway has its media references turned into signed capability URLs.

The watch streams yield their responses already serialized (see :func:`add_to_server`): a live
event is encoded once and the same bytes go to every stream that receives it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from charai.core import validation
from charai.core.domain.provider_models import ProviderModels
from charai.core.errors import PermissionDeniedError
from charai.core.grpcsupport import principal
from charai.core.media import MEDIA_URL_PREFIX, UrlSigner
from charai.core.storeclient import StoreClient
from charai.gateway import access
from charai.gateway.events import EventHub, Watcher
from charai.gateway.follow import Follower, Item, pack, read_log
from charai.gateway.limits import QuotaExceededError, SubmitLimiter
from charai.gateway.tokens import (
    DEFAULT_MAX_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    AccessTokens,
    Scope,
    expired_error,
)
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi import TERMINAL_EVENTS, TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.protobuf import message_factory

Context = grpc.aio.ServicerContext[Any, Any]
HEAD = 2**62
#: The longest task_store may take for one call made on a client's behalf.
STORE_TIMEOUT = 30.0
#: Longest tenant name GetUsage accepts.
MAX_TENANT_CHARS = 200
#: Longest access token CreateAccessToken issues: it must fit an HTTP header line and a URL
#: (aiohttp, nginx and most servers stop at 8 KiB), with room for the rest of either.
MAX_TOKEN_CHARS = 6000


def add_to_server(servicer: TaskService, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated ``add_TaskServiceServicer_to_server``, except
    that the server-streaming methods have no response serializer: they yield bytes, each the
    serialized response, so one live event is encoded once for all the streams it reaches.

    Built from the service descriptor, so every unary method keeps the generated (de)serializers.
    """
    service = task_service_pb2.DESCRIPTOR.services_by_name["TaskService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                behaviour, request_deserializer=request.FromString, response_serializer=None
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _events_per_message(value: int) -> int:
    """A watch request's ``max_events_per_message`` (below 2: one event per message, as before)."""
    if value < 0:
        raise validation.RequestInvalidError(
            [validation.Violation("max_events_per_message", "must not be negative")]
        )
    return value


class TaskService(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        store: StoreClient,
        hub: EventHub,
        signer: UrlSigner,
        base_url: Callable[[], str],
        heartbeat_seconds: float = 5.0,
        max_streams: int = 10_000,
        max_streams_per_tenant: int = 2_000,
        models: ProviderModels | str = "glm-image",
        submit_limiter: SubmitLimiter | None = None,
        operator_tenants: frozenset[str] = frozenset({"default"}),
        tokens: AccessTokens | None = None,
        default_webhooks: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._default_webhooks = dict(default_webhooks or {})
        self._tokens = tokens or AccessTokens([secrets.token_bytes(32)], DEFAULT_MAX_TTL_SECONDS)
        self._operators = operator_tenants
        self._submit_limiter = submit_limiter or SubmitLimiter(rate=0, burst=1)
        #: The configured providers and models, whose limits requests are checked against.
        self._models = models
        self._hub = hub
        self._signer = signer
        self._base_url = base_url
        self._heartbeat = heartbeat_seconds
        self._max_streams = max_streams
        self._max_per_tenant = max_streams_per_tenant
        self.stopping = asyncio.Event()

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _timeout(context: Context) -> float:
        """task_store's deadline for a call: the client's remaining time, at most 30 s."""
        remaining = context.time_remaining()
        return min(remaining, STORE_TIMEOUT) if remaining else STORE_TIMEOUT

    def present(self, task: task_pb2.Task) -> task_pb2.Task:
        """Turns internal media references into signed URLs (in place) and returns the task."""
        base = self._base_url()
        if task.HasField("image_result") and task.image_result.image_url.startswith(MEDIA_URL_PREFIX):
            key = task.image_result.image_url[len(MEDIA_URL_PREFIX) :]
            task.image_result.image_url = self._signer.sign(base, key)
        if task.HasField("tts_result") and task.tts_result.audio_url.startswith(MEDIA_URL_PREFIX):
            key = task.tts_result.audio_url[len(MEDIA_URL_PREFIX) :]
            task.tts_result.audio_url = self._signer.sign(base, key)
        return task

    def _present_event(self, event: task_pb2.TaskEvent) -> task_pb2.TaskEvent:
        if event.HasField("task"):
            self.present(event.task)
        return event

    def _wire(self, event: task_pb2.TaskEvent) -> bytes:
        """A stream response carrying ``event``, presented and serialized. Presented on a copy:
        a live event is shared by every stream that receives it, so it stays as task_store sent
        it. ``WatchTaskResponse`` and ``WatchTasksResponse`` are the same message (``TaskEvent
        event = 1``, ``repeated TaskEvent events = 2``), so these bytes serve both kinds of
        stream, and :func:`~charai.gateway.follow.pack` turns several into one ``events``."""
        response = task_service_pb2.WatchTasksResponse(event=event)
        self._present_event(response.event)
        return response.SerializeToString()

    # -- unary -------------------------------------------------------------------------------
    async def CreateTask(
        self, request: task_service_pb2.CreateTaskRequest, context: Context
    ) -> task_service_pb2.CreateTaskResponse:
        # Before validation: a flood of bad requests costs as much as one of good ones.
        self._submit_limiter.acquire(principal.get())  # a token's creates count for its tenant
        self._fill_webhook(request)
        validation.validate_create(request, self._models)
        access.check_create(request)
        task = await self._store.create_task(
            principal.get(), request, scope=access.create_scope(), timeout=self._timeout(context)
        )
        return task_service_pb2.CreateTaskResponse(task=self.present(task))

    async def BatchCreateTasks(
        self, request: task_service_pb2.BatchCreateTasksRequest, context: Context
    ) -> task_service_pb2.BatchCreateTasksResponse:
        validation.validate_batch_size(request.requests)
        self._submit_limiter.acquire(principal.get(), len(request.requests))  # one per task
        for one in request.requests:
            self._fill_webhook(one)
        validation.validate_batch(request.requests, self._models)  # all or none
        for one in request.requests:
            access.check_create(one)
        tasks = await self._store.batch_create_tasks(
            principal.get(), request.requests, scope=access.create_scope(), timeout=self._timeout(context)
        )
        return task_service_pb2.BatchCreateTasksResponse(tasks=[self.present(t) for t in tasks])

    def _fill_webhook(self, request: task_service_pb2.CreateTaskRequest) -> None:
        """The tenant's default endpoint (CHARAI_TENANT_WEBHOOKS) for a request without one."""
        if not request.HasField("webhook") and (url := self._default_webhooks.get(principal.get())):
            request.webhook.url = url

    async def GetTask(
        self, request: task_service_pb2.GetTaskRequest, context: Context
    ) -> task_service_pb2.GetTaskResponse:
        validation.validate_task_id("id", request.id)
        task = await self._store.get_task(principal.get(), request.id, timeout=self._timeout(context))
        return task_service_pb2.GetTaskResponse(task=self.present(access.check_task(task)))

    async def ListTasks(
        self, request: task_service_pb2.ListTasksRequest, context: Context
    ) -> task_service_pb2.ListTasksResponse:
        validation.validate_list(request)
        ids = access.id_scope()
        if ids is not None:
            tasks = await self._tasks_by_id(ids, request, self._timeout(context))
            return task_service_pb2.ListTasksResponse(tasks=[self.present(t) for t in tasks])
        scoped = task_service_pb2.ListTasksRequest()
        scoped.CopyFrom(request)
        scoped.metadata.clear()
        scoped.metadata.update(access.narrow(request.metadata))
        response = await self._store.list_tasks(principal.get(), scoped, timeout=self._timeout(context))
        return task_service_pb2.ListTasksResponse(
            tasks=[self.present(t) for t in response.tasks], next_page_token=response.next_page_token
        )

    async def _tasks_by_id(
        self, ids: frozenset[str], request: task_service_pb2.ListTasksRequest, timeout: float
    ) -> list[task_pb2.Task]:
        """ListTasks for a token that names its tasks (no metadata scope): those of them that
        exist and match the filter, newest first, on one page."""
        found: list[task_pb2.Task] = []
        for task_id in sorted(ids):
            try:
                task = await self._store.get_task(principal.get(), task_id, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue  # deleted since the token was made
                raise
            if request.type and task.type != request.type:
                continue
            if request.status and task.status != request.status:
                continue
            if dict(request.metadata).items() <= dict(task.metadata).items():
                found.append(task)
        found.sort(key=lambda t: (t.create_time.ToMicroseconds(), t.id), reverse=True)
        return found

    async def CancelTask(
        self, request: task_service_pb2.CancelTaskRequest, context: Context
    ) -> task_service_pb2.CancelTaskResponse:
        validation.validate_task_id("id", request.id)
        if access.scope() is not None:  # a token may cancel only what it reaches
            access.check_task(
                await self._store.get_task(principal.get(), request.id, timeout=self._timeout(context))
            )
        task = await self._store.cancel_task(principal.get(), request.id, timeout=self._timeout(context))
        return task_service_pb2.CancelTaskResponse(task=self.present(task))

    async def GetQueueStats(
        self, request: task_service_pb2.GetQueueStatsRequest, context: Context
    ) -> task_service_pb2.GetQueueStatsResponse:
        # Every lane over all tenants: counts only, but they still show other tenants' volume, so
        # only operator tenants (CHARAI_OPERATOR_TENANTS) may read them.
        access.require_tenant_key("GetQueueStats")
        if principal.get() not in self._operators:
            raise PermissionDeniedError(
                "queue statistics are for operators: add this tenant to CHARAI_OPERATOR_TENANTS",
                setting="CHARAI_OPERATOR_TENANTS",
            )
        response = await self._store.get_queue_stats(timeout=self._timeout(context))
        return task_service_pb2.GetQueueStatsResponse(lanes=response.lanes, providers=response.providers)

    async def GetUsage(
        self, request: task_service_pb2.GetUsageRequest, context: Context
    ) -> task_service_pb2.GetUsageResponse:
        # A tenant reads its own usage and budgets; another tenant's, or every tenant's, names
        # other tenants and their volume: operator tenants only (CHARAI_OPERATOR_TENANTS).
        access.require_tenant_key("GetUsage")
        caller = principal.get()
        if request.all_tenants and request.tenant:
            raise validation.RequestInvalidError(
                [validation.Violation("tenant", "must be empty with all_tenants")]
            )
        if len(request.tenant) > MAX_TENANT_CHARS:
            raise validation.RequestInvalidError(
                [validation.Violation("tenant", f"at most {MAX_TENANT_CHARS} characters")]
            )
        whose = "" if request.all_tenants else (request.tenant or caller)
        if whose != caller and caller not in self._operators:
            raise PermissionDeniedError(
                "another tenant's usage is for operators: add this tenant to CHARAI_OPERATOR_TENANTS",
                setting="CHARAI_OPERATOR_TENANTS",
            )
        return await self._store.get_usage(whose, request, timeout=self._timeout(context))

    async def RetryTask(
        self, request: task_service_pb2.RetryTaskRequest, context: Context
    ) -> task_service_pb2.RetryTaskResponse:
        # Tenant-scoped like every call: a tenant re-runs its own failed tasks (there are no
        # operator roles yet; see README, "Operate and scale").
        access.require_tenant_key("RetryTask")
        validation.validate_task_id("id", request.id)
        task = await self._store.retry_task(principal.get(), request.id, timeout=self._timeout(context))
        return task_service_pb2.RetryTaskResponse(task=self.present(task))

    async def DeleteTask(
        self, request: task_service_pb2.DeleteTaskRequest, context: Context
    ) -> task_service_pb2.DeleteTaskResponse:
        access.require_tenant_key("DeleteTask")
        validation.validate_task_id("id", request.id)
        await self._store.delete_task(principal.get(), request.id, timeout=self._timeout(context))
        return task_service_pb2.DeleteTaskResponse()

    async def CreateAccessToken(
        self, request: task_service_pb2.CreateAccessTokenRequest, context: Context
    ) -> task_service_pb2.CreateAccessTokenResponse:
        access.require_tenant_key("CreateAccessToken")
        # Not ToTimedelta(), which overflows on seconds far outside what a token may last.
        ttl = (
            request.ttl.seconds + request.ttl.nanos / 1e9
            if request.HasField("ttl")
            else min(DEFAULT_TTL_SECONDS, self._tokens.max_ttl_seconds)
        )
        validation.validate_access_token_request(
            list(request.task_ids), request.metadata, request.allow_create, ttl, self._tokens.max_ttl_seconds
        )
        scope = Scope.of(request.task_ids, request.metadata, request.allow_create)
        token, expires = self._tokens.issue(principal.get(), scope, ttl)
        if len(token) > MAX_TOKEN_CHARS:
            # Within every limit one by one, too large together for where a token travels.
            why = (
                f"make a token of {len(token)} characters, more than the {MAX_TOKEN_CHARS} an"
                " Authorization header or an ?access_token= URL carries (servers stop at 8 KiB)"
            )
            named = [f for f, v in (("task_ids", request.task_ids), ("metadata", request.metadata)) if v]
            raise validation.RequestInvalidError([validation.Violation(f, why) for f in named])
        response = task_service_pb2.CreateAccessTokenResponse(token=token)
        response.expire_time.FromNanoseconds(int(expires * 1e9))
        return response

    # -- webhooks ----------------------------------------------------------------------------
    async def GetWebhookSecret(
        self, request: task_service_pb2.GetWebhookSecretRequest, context: Context
    ) -> task_service_pb2.GetWebhookSecretResponse:
        access.require_tenant_key("GetWebhookSecret")
        secret = await self._store.get_webhook_secret(principal.get(), timeout=self._timeout(context))
        return task_service_pb2.GetWebhookSecretResponse(secret=secret)

    async def RotateWebhookSecret(
        self, request: task_service_pb2.RotateWebhookSecretRequest, context: Context
    ) -> task_service_pb2.RotateWebhookSecretResponse:
        access.require_tenant_key("RotateWebhookSecret")
        return await self._store.rotate_webhook_secret(principal.get(), timeout=self._timeout(context))

    async def ListWebhookDeliveries(
        self, request: task_service_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> task_service_pb2.ListWebhookDeliveriesResponse:
        access.require_tenant_key("ListWebhookDeliveries")
        if request.task_id:
            validation.validate_task_id("task_id", request.task_id)
        return await self._store.list_webhook_deliveries(
            principal.get(), request, timeout=self._timeout(context)
        )

    async def RedeliverWebhook(
        self, request: task_service_pb2.RedeliverWebhookRequest, context: Context
    ) -> task_service_pb2.RedeliverWebhookResponse:
        access.require_tenant_key("RedeliverWebhook")
        validation.validate_redeliver(request)
        count = await self._store.redeliver_webhook(principal.get(), request, timeout=self._timeout(context))
        return task_service_pb2.RedeliverWebhookResponse(redelivered=count)

    # -- streams -----------------------------------------------------------------------------
    def _open(self, watcher: Watcher) -> None:
        if self._hub.open_streams >= self._max_streams:
            raise QuotaExceededError(
                f"this gateway has {self._max_streams} open watch streams (CHARAI_MAX_WATCH_STREAMS)",
                limit="max_watch_streams",
                subject="gateway",
            )
        if self._hub.tenant_streams(watcher.tenant) >= self._max_per_tenant:
            raise QuotaExceededError(
                f"at most {self._max_per_tenant} open watch streams per tenant"
                " (CHARAI_MAX_WATCH_STREAMS_PER_TENANT)",
                limit="max_watch_streams_per_tenant",
                subject=f"tenant:{watcher.tenant}",
            )
        self._hub.add(watcher)

    async def _until_expiry(self, follower: Follower) -> AsyncIterator[list[Item]]:
        """The follower's groups of events; for an access token, only until it expires: the
        stream then ends with UNAUTHENTICATED (ACCESS_TOKEN_EXPIRED), noticed at the latest with
        the next heartbeat."""
        token = access.current.get()
        async for group in follower.stream():
            if token is not None and self._tokens.expired(token):
                raise expired_error()
            yield group

    def _follower(
        self, watcher: Watcher, query: spb.ListEventsRequest, floor: int, *, single_task: bool
    ) -> Follower:
        return Follower(
            self._store,
            watcher,
            query,
            floor,
            single_task=single_task,
            wire=self._wire,
            heartbeat_seconds=self._heartbeat,
            stopping=self.stopping,
        )

    async def WatchTask(  # type: ignore[override]  # serialized responses: see add_to_server
        self, request: task_service_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[bytes]:
        validation.validate_task_id("id", request.id)
        if request.after_sequence < 0:
            raise validation.RequestInvalidError(
                [validation.Violation("after_sequence", "must not be negative")]
            )
        per_message = _events_per_message(request.max_events_per_message)
        tenant = principal.get()
        if access.scope() is not None:  # a token watches only what it reaches (NOT_FOUND otherwise)
            access.check_task(await self._store.get_task(tenant, request.id, timeout=STORE_TIMEOUT))
        await self._head_at_least(tenant, request.after_sequence)
        watcher = Watcher(tenant=tenant, task_id=request.id)
        self._open(watcher)
        try:
            # Headers now, not with the first event: proxies and gRPC-web clients see the stream
            # open at once even when nothing happens for a while.
            await context.send_initial_metadata(())
            await self._hub.ready()  # live events flow before the log is read
            query = spb.ListEventsRequest(
                tenant=tenant, task_id=request.id, after_sequence=request.after_sequence
            )
            current = await self._store.get_task(tenant, request.id, timeout=STORE_TIMEOUT)
            if request.after_sequence == 0:
                snapshot = await self._snapshot(current, query)
                last = snapshot.sequence
                yield self._wire(snapshot)
                if snapshot.task.status in TERMINAL_STATUSES:
                    return
            else:
                last = request.after_sequence
                if current.status in TERMINAL_STATUSES:
                    # Nothing more will happen: send what the client missed, then end.
                    missed, _ = await read_log(self._store, query)
                    for message in pack([(e.type, self._wire(e)) for e in missed], per_message):
                        yield message
                    return
            async for group in self._until_expiry(self._follower(watcher, query, last, single_task=True)):
                ends = next((n for n, (kind, _) in enumerate(group) if kind in TERMINAL_EVENTS), None)
                for message in pack(group if ends is None else group[: ends + 1], per_message):
                    yield message
                if ends is not None:
                    return  # the terminal event is the stream's last
        finally:
            self._hub.remove(watcher)

    async def _head_at_least(self, tenant: str, after: int) -> None:
        """Refuses a resume cursor past the newest event: it cannot come from this event log
        (another deployment, a wiped database), and a stream following it would skip every
        event up to it: a task's stream never ended, a many-task stream stayed silent."""
        if after <= 0:
            return
        probe = spb.ListEventsRequest(tenant=tenant, task_id="", after_sequence=HEAD, limit=1)
        _, head = await read_log(self._store, probe)
        if after > head:
            raise validation.RequestInvalidError(
                [
                    validation.Violation(
                        "after_sequence",
                        f"is past the newest event ({head}): not a cursor of this event log;"
                        " start again from 0",
                    )
                ]
            )

    async def _snapshot(self, current: task_pb2.Task, query: spb.ListEventsRequest) -> task_pb2.TaskEvent:
        """The task as of its latest event (so resuming from it misses nothing), with the queue
        position of ``current``."""
        history, _ = await read_log(self._store, query)
        snapshot = task_pb2.TaskEvent(type=task_pb2.TASK_EVENT_TYPE_SNAPSHOT)
        if history:
            snapshot.sequence = history[-1].sequence
            snapshot.task.CopyFrom(history[-1].task)
            snapshot.time.CopyFrom(history[-1].time)
            snapshot.task.queue_position = current.queue_position
            for field in ("estimated_start_time", "estimated_end_time"):
                if current.HasField(field):
                    getattr(snapshot.task, field).CopyFrom(getattr(current, field))
                else:
                    snapshot.task.ClearField(field)
        else:
            snapshot.task.CopyFrom(current)
        return snapshot

    async def WatchTasks(  # type: ignore[override]  # serialized responses: see add_to_server
        self, request: task_service_pb2.WatchTasksRequest, context: Context
    ) -> AsyncIterator[bytes]:
        validation.validate_watch_filter(request.metadata, request.type, request.after_sequence)
        per_message = _events_per_message(request.max_events_per_message)
        tenant = principal.get()
        ids = access.id_scope()
        metadata = access.narrow(request.metadata)
        await self._head_at_least(tenant, request.after_sequence)
        watcher = Watcher(
            tenant=tenant, metadata=metadata, task_type=request.type, task_ids=ids or frozenset()
        )
        self._open(watcher)
        try:
            await context.send_initial_metadata(())
            await self._hub.ready()  # live events flow before the log is read
            query = spb.ListEventsRequest(
                tenant=tenant,
                metadata=metadata,
                type=request.type,
                after_sequence=request.after_sequence,
            )
            last = request.after_sequence
            if last == 0:
                probe = spb.ListEventsRequest(tenant=tenant, task_id="", after_sequence=HEAD, limit=1)
                _, last = await read_log(self._store, probe)
            async for group in self._until_expiry(self._follower(watcher, query, last, single_task=False)):
                for message in pack(group, per_message):
                    yield message
        finally:
            self._hub.remove(watcher)
