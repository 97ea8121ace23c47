"""Client of the internal task_store API, shared by gateways and workers.

:class:`StoreClient` has one typed method per ``TaskStoreService`` RPC. What every call carries
is added in one place, :class:`CallDefaults`, a client interceptor on the channel: the internal
bearer token, the caller's trace (``traceparent``) and a deadline when the caller set none
(:mod:`charai.core.storechannel`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from charai.core import tracing
from charai.core.coalesce import Coalescer, error_bytes
from charai.core.exchange_stream import ExchangeStreams, PushHandler
from charai.core.storechannel import (
    DEFAULT_TIMEOUT,
    INTERNAL_MAX_MESSAGE_BYTES,
    SERVICE_CONFIG,
    CallDefaults,
    addresses,
    channel_target,
)
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc
from charai.tasks.v1 import task_pb2, task_service_pb2

if TYPE_CHECKING:
    from charai.store.v1.store_service_pb2_grpc import TaskStoreServiceAsyncStub


class StoreClient:
    """A channel to task_store and one typed method per ``TaskStoreService`` RPC.

    Every method takes ``timeout`` (seconds); without it the call gets the client's default
    deadline. Failures raise ``grpc.aio.AioRpcError`` as task_store answered them. Calls wait for
    task_store to be reachable and are retried on UNAVAILABLE (the channel's service config).

    With ``coalesce`` (gateways, workers and webhook senders), creates, claims, progress reports,
    outcomes and a sender's claims and settlements of deliveries travel batched in ``Exchange``
    calls (:mod:`charai.core.coalesce`): same answers, errors and deadlines, far fewer calls; with
    ``stream`` (``CHARAI_EXCHANGE_STREAM``) those calls are messages of long-lived
    ``ExchangeStream`` calls (:mod:`charai.core.exchange_stream`). A task_store that does not
    know them yet (an older version during a rolling upgrade) gets unary calls.
    """

    def __init__(
        self,
        addr: str | Sequence[str],
        token: str = "",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        coalesce: bool = False,
        stream: bool = False,
    ) -> None:
        target, balanced = channel_target(addr)
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", INTERNAL_MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if balanced:
            # Several task_store replicas: spread calls, and route around one that is down
            # (its subchannel leaves the pick list), so a worker never stalls on a dead replica.
            options.append(("grpc.lb_policy_name", "round_robin"))
        self._timeout = timeout
        defaults = CallDefaults(token, timeout)
        self._channel = grpc.aio.insecure_channel(
            target, options=options, interceptors=defaults.interceptors()
        )
        self._stub: TaskStoreServiceAsyncStub = store_service_pb2_grpc.TaskStoreServiceStub(self._channel)  # type: ignore[assignment]
        self._closed = False
        self._exchange_known = True
        #: Kinds of command task_store does not know in Exchange (see _command).
        self._unknown: set[str] = set()
        #: The batcher of :meth:`exchange` (None: every call is unary).
        self.coalescer = Coalescer(self._send_exchange) if coalesce else None
        #: The coalescer's transport: long-lived ExchangeStream calls, one per address given
        #: (None: unary Exchange calls).
        self._streams: ExchangeStreams | None = None
        if coalesce and stream:
            metadata = defaults.stream_metadata
            self._streams = ExchangeStreams(
                lambda: self._stub.ExchangeStream(metadata=metadata, wait_for_ready=True),
                streams=len(addresses(addr)),
            )

    # -- the batched data plane ---------------------------------------------------------------
    async def _command(
        self, command: spb.StoreCommand, timeout: float | None, batched: bool = True
    ) -> spb.StoreAnswer | None:
        """The command's answer through the coalescer, or None: make the unary call instead.

        A task_store older than a kind of command (a rolling upgrade) drops it as an unknown
        field and refuses the empty command it is left with (``commands.command``): that kind
        goes by unary calls from then on."""
        kind = command.WhichOneof("command")
        if self.coalescer is None or not batched or not self._exchange_known or kind in self._unknown:
            return None
        if not command.traceparent:
            command.traceparent = tracing.current.get()  # each command keeps its own trace
        try:
            return await self.coalescer.call(command, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "commands.command" not in (
                exc.details() or ""
            ):
                raise
            self._unknown.add(kind or "")
            return None

    async def _send_exchange(
        self, commands: list[spb.StoreCommand], timeout: float | None
    ) -> spb.ExchangeResponse:
        if self._streams is not None and self._streams.supported:
            try:
                request = spb.ExchangeStreamRequest(request=spb.ExchangeRequest(commands=commands))
                # No deadline given: the client's default, as CallDefaults gives a unary call.
                return await self._streams.exchange(request, self._timeout if timeout is None else timeout)
            except grpc.aio.AioRpcError:
                if self._streams.supported:
                    raise
        if self._exchange_known:
            try:
                return await self._stub.Exchange(spb.ExchangeRequest(commands=commands), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._exchange_known = False
        return await self._one_by_one(commands, timeout)

    async def _one_by_one(
        self, commands: list[spb.StoreCommand], timeout: float | None
    ) -> spb.ExchangeResponse:
        """Exchange's answers from unary calls (a task_store without ``Exchange``)."""
        stub, t = self._stub, timeout

        async def one(command: spb.StoreCommand) -> spb.StoreAnswer:
            kind = command.WhichOneof("command")
            try:
                if kind == "create":
                    return spb.StoreAnswer(create=await stub.CreateTask(command.create, timeout=t))
                if kind == "batch_create":
                    batch = await stub.BatchCreateTasks(command.batch_create, timeout=t)
                    return spb.StoreAnswer(batch_create=batch)
                if kind == "claim":
                    return spb.StoreAnswer(claim=await stub.ClaimTask(command.claim, timeout=t))
                if kind == "progress":
                    return spb.StoreAnswer(progress=await stub.ReportProgress(command.progress, timeout=t))
                if kind == "complete":
                    return spb.StoreAnswer(complete=await stub.CompleteTask(command.complete, timeout=t))
                if kind == "webhook_claim":
                    claim = await stub.ClaimWebhookDelivery(command.webhook_claim, timeout=t)
                    return spb.StoreAnswer(webhook_claim=claim)
                if kind == "webhook_settle":
                    settle = await stub.SettleWebhookDelivery(command.webhook_settle, timeout=t)
                    return spb.StoreAnswer(webhook_settle=settle)
                return spb.StoreAnswer(fail=await stub.FailTask(command.fail, timeout=t))
            except grpc.aio.AioRpcError as exc:
                return spb.StoreAnswer(error=error_bytes(exc))

        return spb.ExchangeResponse(answers=await asyncio.gather(*(one(c) for c in commands)))

    # -- the public API's tasks, on behalf of a tenant (gateways) -------------------------
    async def create_task(
        self,
        tenant: str,
        request: task_service_pb2.CreateTaskRequest,
        *,
        scope: spb.CreateScope | None = None,
        timeout: float | None = None,
    ) -> task_pb2.Task:
        """Accepts a validated task (or returns the one an earlier request with the same
        ``request_id`` created, if ``scope``, the caller's access token's reach, reaches it)."""
        create = spb.CreateTaskRequest(tenant=tenant, request=request, scope=scope)
        command = spb.StoreCommand(create=create, traceparent=tracing.current.get())
        answer = await self._command(command, timeout)
        if answer is not None:
            return answer.create.task
        response = await self._stub.CreateTask(create, timeout=timeout)
        return response.task

    async def batch_create_tasks(
        self,
        tenant: str,
        requests: Sequence[task_service_pb2.CreateTaskRequest],
        *,
        scope: spb.CreateScope | None = None,
        timeout: float | None = None,
    ) -> list[task_pb2.Task]:
        """Creates several tasks in one transaction (all or none); the tasks in request order."""
        batch = spb.BatchCreateTasksRequest(tenant=tenant, requests=requests, scope=scope)
        command = spb.StoreCommand(batch_create=batch, traceparent=tracing.current.get())
        answer = await self._command(command, timeout)
        if answer is not None:
            return list(answer.batch_create.tasks)
        response = await self._stub.BatchCreateTasks(batch, timeout=timeout)
        return list(response.tasks)

    async def get_task(self, tenant: str, task_id: str, *, timeout: float | None = None) -> task_pb2.Task:
        response = await self._stub.GetTask(spb.GetTaskRequest(tenant=tenant, id=task_id), timeout=timeout)
        return response.task

    async def list_tasks(
        self, tenant: str, request: task_service_pb2.ListTasksRequest, *, timeout: float | None = None
    ) -> spb.ListTasksResponse:
        """One page of the tenant's tasks (``tasks`` and ``next_page_token``)."""
        return await self._stub.ListTasks(
            spb.ListTasksRequest(tenant=tenant, request=request), timeout=timeout
        )

    async def cancel_task(self, tenant: str, task_id: str, *, timeout: float | None = None) -> task_pb2.Task:
        response = await self._stub.CancelTask(
            spb.CancelTaskRequest(tenant=tenant, id=task_id), timeout=timeout
        )
        return response.task

    async def retry_task(self, tenant: str, task_id: str, *, timeout: float | None = None) -> task_pb2.Task:
        """Queues a FAILED task again with a fresh attempt budget."""
        response = await self._stub.RetryTask(
            spb.RetryTaskRequest(tenant=tenant, id=task_id), timeout=timeout
        )
        return response.task

    async def delete_task(self, tenant: str, task_id: str, *, timeout: float | None = None) -> None:
        """Removes an ended task, its events and its media."""
        await self._stub.DeleteTask(spb.DeleteTaskRequest(tenant=tenant, id=task_id), timeout=timeout)

    # -- webhooks ----------------------------------------------------------------------------
    async def get_webhook_secret(self, tenant: str, *, timeout: float | None = None) -> str:
        """The tenant's current webhook signing secret (``whsec_…``)."""
        response = await self._stub.GetWebhookSecret(
            spb.GetWebhookSecretRequest(tenant=tenant), timeout=timeout
        )
        return response.response.secret

    async def rotate_webhook_secret(
        self, tenant: str, *, timeout: float | None = None
    ) -> task_service_pb2.RotateWebhookSecretResponse:
        """A new secret; the old one keeps signing for the grace period."""
        response = await self._stub.RotateWebhookSecret(
            spb.RotateWebhookSecretRequest(tenant=tenant), timeout=timeout
        )
        return response.response

    async def list_webhook_deliveries(
        self,
        tenant: str,
        request: task_service_pb2.ListWebhookDeliveriesRequest,
        *,
        timeout: float | None = None,
    ) -> task_service_pb2.ListWebhookDeliveriesResponse:
        response = await self._stub.ListWebhookDeliveries(
            spb.ListWebhookDeliveriesRequest(tenant=tenant, request=request), timeout=timeout
        )
        return response.response

    async def redeliver_webhook(
        self, tenant: str, request: task_service_pb2.RedeliverWebhookRequest, *, timeout: float | None = None
    ) -> int:
        """Queues deliveries again; how many."""
        response = await self._stub.RedeliverWebhook(
            spb.RedeliverWebhookRequest(tenant=tenant, request=request), timeout=timeout
        )
        return response.response.redelivered

    async def claim_webhook_delivery(
        self, delivery_id: str, sender_id: str, *, timeout: float | None = None
    ) -> spb.ClaimWebhookDeliveryResponse:
        """What a sender should send for a published delivery (or why not now)."""
        request = spb.ClaimWebhookDeliveryRequest(delivery_id=delivery_id, sender_id=sender_id)
        answer = await self._command(spb.StoreCommand(webhook_claim=request), timeout)
        if answer is not None:
            return answer.webhook_claim
        return await self._stub.ClaimWebhookDelivery(request, timeout=timeout)

    async def settle_webhook_delivery(
        self, request: spb.SettleWebhookDeliveryRequest, *, timeout: float | None = None
    ) -> spb.SettleWebhookDeliveryResponse:
        """Records an attempt; the answer says whether to ack or retry later."""
        answer = await self._command(spb.StoreCommand(webhook_settle=request), timeout)
        if answer is not None:
            return answer.webhook_settle
        return await self._stub.SettleWebhookDelivery(request, timeout=timeout)

    async def list_events(
        self, request: spb.ListEventsRequest, *, timeout: float | None = None
    ) -> spb.ListEventsResponse:
        """One page of the event log after ``request.after_sequence`` (``events``, and the log's
        ``head_sequence``). The request is passed as is, so a pager can move its cursor."""
        return await self._stub.ListEvents(request, timeout=timeout)

    async def get_queue_stats(self, *, timeout: float | None = None) -> spb.GetQueueStatsResponse:
        """Every lane over all tenants, and the outbox backlog."""
        return await self._stub.GetQueueStats(spb.GetQueueStatsRequest(), timeout=timeout)

    async def get_usage(
        self, tenant: str, request: task_service_pb2.GetUsageRequest, *, timeout: float | None = None
    ) -> task_service_pb2.GetUsageResponse:
        """Usage by tenant, provider, model and day: ``tenant``'s, or every tenant's when empty."""
        response = await self._stub.GetUsage(
            spb.GetUsageRequest(tenant=tenant, request=request), timeout=timeout
        )
        return response.response

    # -- one attempt of a task (workers) --------------------------------------------------
    @property
    def pushes(self) -> bool:
        """Whether this client can take pushed jobs (it talks to task_store over ExchangeStream)."""
        return self._streams is not None and self._streams.supported

    def on_push(self, handler: PushHandler) -> None:
        """Calls ``handler`` with each job task_store pushes to this client's offers."""
        if self._streams is not None:
            self._streams.on_push = handler

    async def offer(self, worker_id: str, types: Sequence[int], slots: int) -> bool:
        """Offers ``slots`` free slots for jobs of ``types`` (0 withdraws the offer): push
        dispatch (``WorkerOffer``). False if it could not be sent (no stream, or it broke)."""
        if self._streams is None:
            return False
        offer = spb.WorkerOffer(worker_id=worker_id, types=types, slots=slots)  # type: ignore[arg-type]
        return await self._streams.offer(offer)

    async def claim_task(
        self,
        task_id: str,
        dispatch_gen: int,
        worker_id: str,
        *,
        again: bool = False,
        any_task: bool = False,
        timeout: float | None = None,
    ) -> spb.ClaimTaskResponse:
        """Starts an attempt for a delivered job, or says to skip (DONE) or defer it; ``again``:
        this worker's earlier claim of the job got no answer (ClaimTaskRequest.again);
        ``any_task``: the answer may start another task instead (ClaimTaskRequest.any_task)."""
        request = spb.ClaimTaskRequest(
            task_id=task_id, dispatch_gen=dispatch_gen, worker_id=worker_id, again=again, any_task=any_task
        )
        answer = await self._command(spb.StoreCommand(claim=request), timeout)
        if answer is not None:
            return answer.claim
        return await self._stub.ClaimTask(request, timeout=timeout)

    async def report_progress(
        self, task_id: str, attempt: int, progress: int, stage: str, *, timeout: float | None = None
    ) -> task_pb2.TaskStatus.ValueType:
        """Records progress and renews the attempt's lease; returns the task's status.
        FAILED_PRECONDITION once the attempt is no longer the task's current one."""
        request = spb.ReportProgressRequest(task_id=task_id, attempt=attempt, progress=progress, stage=stage)
        answer = await self._command(spb.StoreCommand(progress=request), timeout)
        if answer is not None:
            return answer.progress.status
        response = await self._stub.ReportProgress(request, timeout=timeout)
        return response.status

    async def complete_task(
        self,
        task_id: str,
        attempt: int,
        result: task_pb2.ImageResult | task_pb2.TtsResult,
        *,
        progress: int = 0,
        stage: str = "",
        usage: task_pb2.Usage | None = None,
        timeout: float | None = None,
    ) -> task_pb2.Task:
        """Records the attempt's result (with a last progress and stage, when given, and what
        its provider calls used)."""
        request = spb.CompleteTaskRequest(
            task_id=task_id, attempt=attempt, progress=progress, stage=stage, usage=usage
        )
        if isinstance(result, task_pb2.ImageResult):
            request.image_result.CopyFrom(result)
        else:
            request.tts_result.CopyFrom(result)
        answer = await self._command(spb.StoreCommand(complete=request), timeout)
        if answer is not None:
            return answer.complete.task
        response = await self._stub.CompleteTask(request, timeout=timeout)
        return response.task

    async def fail_task(
        self,
        task_id: str,
        attempt: int,
        error: task_pb2.TaskError,
        *,
        retry_after_seconds: float = 0.0,
        usage: task_pb2.Usage | None = None,
        timeout: float | None = None,
        batched: bool = True,
    ) -> spb.FailTaskResponse:
        """Records the attempt's failure; the answer says whether a retry is scheduled.
        ``batched=False``: a unary call even on a coalescing client (the hand-back at shutdown
        must not wait behind calls stuck on an unreachable task_store)."""
        request = spb.FailTaskRequest(
            task_id=task_id,
            attempt=attempt,
            error=error,
            retry_after_seconds=retry_after_seconds,
            usage=usage,
        )
        answer = await self._command(spb.StoreCommand(fail=request), timeout, batched)
        if answer is not None:
            return answer.fail
        return await self._stub.FailTask(request, timeout=timeout)

    # -- the channel ------------------------------------------------------------------------
    async def serving(self, timeout: float = 2.0) -> bool:
        """Whether task_store answers its gRPC health check with SERVING (it reports NOT_SERVING
        while its own dependencies are away), for the callers' health watchers."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.coalescer is not None:
                await self.coalescer.close()
            if self._streams is not None:
                await self._streams.close()
            await self._channel.close()

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
