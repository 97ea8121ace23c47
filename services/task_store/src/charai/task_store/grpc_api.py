"""The internal TaskStoreService: translation between proto requests and the store, nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
import structlog
from charai.core import tracing, validation
from charai.core.domain.provider_models import ProviderModels
from charai.core.errors import UnauthenticatedError
from charai.core.grpcsupport import status_for
from charai.core.metrics import Metrics
from charai.core.validation import RequestInvalidError, Violation
from charai.store.v1 import store_service_pb2 as spb
from charai.store.v1 import store_service_pb2_grpc as spb_grpc
from charai.task_store.commands import ClaimResult, WorkerAnswer, WorkerRequest
from charai.task_store.creates import Asker
from charai.task_store.push import Offers
from charai.task_store.removal import MediaRemover, remove_task
from charai.task_store.store import TaskStore
from charai.task_store.streams import Drain, serve
from charai.tasks.v1 import task_service_pb2 as tpb
from google.rpc import code_pb2, status_pb2

Context = grpc.aio.ServicerContext[Any, Any]
log = structlog.get_logger("task_store")
#: Commands per Exchange call at most.
MAX_EXCHANGE = 1000
#: Each command's name in its log line: the unary RPC it stands for.
_COMMAND_NAMES = {
    "create": "CreateTask",
    "batch_create": "BatchCreateTasks",
    "claim": "ClaimTask",
    "progress": "ReportProgress",
    "complete": "CompleteTask",
    "fail": "FailTask",
    "webhook_claim": "ClaimWebhookDelivery",
    "webhook_settle": "SettleWebhookDelivery",
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: The commands of a worker, which one Exchange call decides in one transaction (worker_each).
_WORKER_COMMANDS = frozenset({"claim", "progress", "complete", "fail"})


def _refusal(exc: Exception) -> tuple[spb.StoreAnswer, str]:
    """A command's error as its answer, and the name of its code (for the log line)."""
    status = status_for(exc)
    if status is None:
        log.error("exchange_command_failed", exc_info=exc)
        status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    code = _CODES[status.code].name if status.code in _CODES else "UNKNOWN"
    return spb.StoreAnswer(error=status.SerializeToString()), code


def _code_name(error: bytes) -> str:
    code = status_pb2.Status.FromString(error).code
    return _CODES[code].name if code in _CODES else "UNKNOWN"


def _scope(request: spb.CreateTaskRequest | spb.BatchCreateTasksRequest) -> spb.CreateScope | None:
    """The access token's reach a create came with (None: a tenant key)."""
    return request.scope if request.HasField("scope") else None


def _asker(command: spb.StoreCommand) -> Asker:
    """Who a create command answers (:class:`~charai.task_store.creates.Asker`)."""
    if command.HasField("batch_create"):
        return Asker(True, _scope(command.batch_create))
    return Asker(False, _scope(command.create))


R = TypeVar("R")


async def _together(work: Awaitable[Sequence[R | Exception]], n: int) -> list[R | spb.StoreAnswer]:
    """The results of ``n`` commands run in one transaction, each refusal as its answer; if the
    transaction itself failed, one refusal (logged once) answers all of them."""
    try:
        made = await work
    except Exception as exc:
        return [_refusal(exc)[0]] * n
    return [_refusal(result)[0] if isinstance(result, Exception) else result for result in made]


def _log_finished(name: str, answer: spb.StoreAnswer, traceparent: str, start: float) -> None:
    """A grouped command's canonical log line, as its own RPC would have written it."""
    code = _code_name(answer.error) if answer.WhichOneof("answer") == "error" else "OK"
    elapsed_ms = round((time.perf_counter() - start) * 1000, 2)
    trace = tracing.trace_id(traceparent)
    log.info("command_finished", command=name, trace_id=trace, code=code, elapsed_ms=elapsed_ms)


class TaskStoreServicer(spb_grpc.TaskStoreServiceServicer):
    def __init__(
        self,
        store: TaskStore,
        on_created: Any = None,
        lease_seconds: float = 30.0,
        models: ProviderModels | str = "glm-image",
        media: MediaRemover | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._media = media
        self._models = models
        self._on_created = on_created
        self._lease_seconds = lease_seconds
        #: Ends the open ExchangeStream calls at shutdown (before the server stops).
        self.drain = Drain()
        #: Workers' standing offers (push dispatch; set by the app when it is on).
        self.offers: Offers | None = None
        #: The provider credentials' shared states for GetQueueStats (set by the app: NATS KV).
        self.providers: Callable[[], list[tpb.ProviderState]] | None = None

    def _created(self) -> None:
        """Wakes the relay after creates committed, unless the store hands new jobs straight to
        it (``TaskStore.hand_off``): then each job was handed over already, or is held in the
        fair backlog, whose release hands it over too, and the wake-up would only cost the relay
        an empty claim, a transaction of its own (one per create call under load)."""
        if self._on_created is not None and not self._store.hands_off:
            self._on_created()

    async def CreateTask(self, request: spb.CreateTaskRequest, context: Context) -> spb.CreateTaskResponse:
        validation.validate_create(request.request, self._models)
        task, created = await self._store.create(
            request.tenant, request.request, tracing.current.get(), _scope(request)
        )
        if created:
            self._created()
        return spb.CreateTaskResponse(task=task)

    async def BatchCreateTasks(
        self, request: spb.BatchCreateTasksRequest, context: Context
    ) -> spb.BatchCreateTasksResponse:
        validation.validate_batch(request.requests, self._models)
        made = await self._store.create_many(
            request.tenant, request.requests, tracing.current.get(), _scope(request)
        )
        if any(created for _, created in made):
            self._created()
        return spb.BatchCreateTasksResponse(tasks=[task for task, _ in made])

    async def GetTask(self, request: spb.GetTaskRequest, context: Context) -> spb.GetTaskResponse:
        validation.validate_task_id("id", request.id)
        return spb.GetTaskResponse(task=await self._store.get(request.tenant, request.id))

    async def ListTasks(self, request: spb.ListTasksRequest, context: Context) -> spb.ListTasksResponse:
        validation.validate_list(request.request)
        tasks, token = await self._store.list_tasks(request.tenant, request.request)
        return spb.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def CancelTask(self, request: spb.CancelTaskRequest, context: Context) -> spb.CancelTaskResponse:
        validation.validate_task_id("id", request.id)
        task, _ = await self._store.cancel(request.tenant, request.id)
        return spb.CancelTaskResponse(task=task)

    async def ListEvents(self, request: spb.ListEventsRequest, context: Context) -> spb.ListEventsResponse:
        if request.task_id:
            validation.validate_task_id("task_id", request.task_id)
        else:
            validation.validate_watch_filter(request.metadata, request.type, request.after_sequence)
        events, head, more = await self._store.events_page(request)
        return spb.ListEventsResponse(events=events, head_sequence=head, more=more)

    async def ClaimTask(self, request: spb.ClaimTaskRequest, context: Context) -> spb.ClaimTaskResponse:
        claim = await self._store.claim(
            request.task_id, request.dispatch_gen, request.worker_id, request.again, request.any_task
        )
        return self._claimed(claim)

    def _claimed(self, claim: ClaimResult) -> spb.ClaimTaskResponse:
        response = spb.ClaimTaskResponse(
            outcome=claim.outcome,  # type: ignore[arg-type]
            attempt=claim.attempt,
            retry_after_seconds=claim.retry_after,
            lease_seconds=self._lease_seconds,
        )
        if claim.task is not None:
            response.task.CopyFrom(claim.task)
        return response

    async def ReportProgress(
        self, request: spb.ReportProgressRequest, context: Context
    ) -> spb.ReportProgressResponse:
        status = await self._store.progress(request.task_id, request.attempt, request.progress, request.stage)
        return spb.ReportProgressResponse(status=status)  # type: ignore[arg-type]

    async def CompleteTask(
        self, request: spb.CompleteTaskRequest, context: Context
    ) -> spb.CompleteTaskResponse:
        return spb.CompleteTaskResponse(task=await self._store.complete(request))

    async def FailTask(self, request: spb.FailTaskRequest, context: Context) -> spb.FailTaskResponse:
        outcome, delay, task = await self._store.fail(request)
        return spb.FailTaskResponse(outcome=outcome, retry_delay_seconds=delay, task=task)  # type: ignore[arg-type]

    async def GetQueueStats(
        self, request: spb.GetQueueStatsRequest, context: Context
    ) -> spb.GetQueueStatsResponse:
        lanes, backlog = await self._store.queue_stats()
        providers = self.providers() if self.providers is not None else []
        return spb.GetQueueStatsResponse(lanes=lanes, outbox_backlog=backlog, providers=providers)

    async def GetUsage(self, request: spb.GetUsageRequest, context: Context) -> spb.GetUsageResponse:
        return spb.GetUsageResponse(response=await self._store.get_usage(request.tenant, request.request))

    async def DeleteTask(self, request: spb.DeleteTaskRequest, context: Context) -> spb.DeleteTaskResponse:
        validation.validate_task_id("id", request.id)
        await remove_task(self._store, self._media, request.tenant, request.id)
        return spb.DeleteTaskResponse()

    async def RetryTask(self, request: spb.RetryTaskRequest, context: Context) -> spb.RetryTaskResponse:
        validation.validate_task_id("id", request.id)
        task = await self._store.retry(request.tenant, request.id)
        if self._on_created is not None:
            self._on_created()  # wake the relay: the re-run's job is in the outbox
        return spb.RetryTaskResponse(task=task)

    # -- the batched data plane ------------------------------------------------------------
    def ExchangeStream(
        self, requests: AsyncIterator[spb.ExchangeStreamRequest], context: Context
    ) -> AsyncIterator[spb.ExchangeStreamResponse]:
        """Exchange calls as messages of one call (:mod:`charai.task_store.streams`)."""

        async def answer(request: spb.ExchangeStreamRequest) -> spb.ExchangeStreamResponse:
            # Counted (charai_rpc_requests_total, charai_rpc_duration_seconds) as the Exchange
            # call it stands for; the stream itself counts once, when it ends.
            start, code = time.perf_counter(), "OK"
            try:
                response = spb.ExchangeStreamResponse()
                response.response.CopyFrom(await self.Exchange(request.request, context))
                return response
            except Exception as exc:
                refusal, code = _refusal(exc)
                return spb.ExchangeStreamResponse(error=refusal.error)
            finally:
                if self._metrics is not None:
                    self._metrics.observe_rpc("Exchange", code, time.perf_counter() - start)

        return serve(requests, answer, self.drain, self.offers)

    async def Exchange(self, request: spb.ExchangeRequest, context: Context) -> spb.ExchangeResponse:
        """Each command as its unary RPC, all at once: their writes queue together, so SQLite
        commits them in one group commit; answers in order, refusals per command."""
        if len(request.commands) > MAX_EXCHANGE:
            raise RequestInvalidError([Violation("commands", f"at most {MAX_EXCHANGE} commands per call")])
        if self._metrics is not None and request.commands:
            kind = request.commands[0].WhichOneof("command") or "none"
            self._metrics.exchange_size(kind, len(request.commands))
        commands = request.commands
        answers: list[spb.StoreAnswer] = [spb.StoreAnswer()] * len(commands)
        # The creates (single and batch) of one tenant share one transaction (create_each), and
        # so do a worker's claims, progress reports and outcomes (worker_each): each command as if
        # in a savepoint of its own (UnitRunner.write_each) instead of a unit of work, a database
        # job and an asyncio task each.
        creates: dict[str, list[int]] = {}
        work: list[int] = []
        for i, command in enumerate(commands):
            which = command.WhichOneof("command")
            if which == "create":
                creates.setdefault(command.create.tenant, []).append(i)
            elif which == "batch_create":
                creates.setdefault(command.batch_create.tenant, []).append(i)
            elif which in _WORKER_COMMANDS:
                work.append(i)
        groups = [group for group in (*creates.values(), work) if len(group) > 1]
        grouped = {i for group in groups for i in group}
        jobs = [
            self._answer_at(i, command, answers, context)
            for i, command in enumerate(commands)
            if i not in grouped
        ]
        jobs += [self._creates(commands, t, group, answers) for t, group in creates.items() if len(group) > 1]
        if len(work) > 1:
            jobs.append(self._work(commands, work, answers))
        if len(jobs) == 1:
            await jobs[0]  # alone (an idle caller's one command): no task of its own to wait for
        else:
            await asyncio.gather(*jobs)
        return spb.ExchangeResponse(answers=answers)

    async def _answer_at(
        self, i: int, command: spb.StoreCommand, answers: list[spb.StoreAnswer], context: Context
    ) -> None:
        answers[i] = await self._answer(command, context)

    async def _answer(self, command: spb.StoreCommand, context: Context) -> spb.StoreAnswer:
        """One command, with its own trace and log line. It runs in an asyncio task of its own,
        unless it is the call's only one: it then runs in the call's task, whose trace and log
        context it leaves as it found them."""
        kind = command.WhichOneof("command")
        start, code = time.perf_counter(), "OK"
        outer = tracing.current.get()
        traceparent = tracing.enter(command.traceparent)
        name = _COMMAND_NAMES.get(kind or "", "none")
        # Bound and reset by token: structlog's bound_contextvars() copies the whole context
        # first, which cost more than the rest of this wrapper.
        bound = structlog.contextvars.bind_contextvars(command=name, trace_id=tracing.trace_id(traceparent))
        try:
            return await self._decide(command, kind, context)
        except Exception as exc:
            answer, code = _refusal(exc)
            return answer
        finally:
            elapsed_ms = round((time.perf_counter() - start) * 1000, 2)
            log.info("command_finished", code=code, elapsed_ms=elapsed_ms)
            structlog.contextvars.reset_contextvars(**bound)
            tracing.current.set(outer)

    async def _creates(
        self,
        commands: Sequence[spb.StoreCommand],
        tenant: str,
        group: list[int],
        answers: list[spb.StoreAnswer],
    ) -> None:
        """Creates and batch creates of one tenant in one transaction; each answered (and
        logged) as its own CreateTask or BatchCreateTasks would be: a refusal is its alone."""
        start = time.perf_counter()
        valid: list[int] = []
        for i in group:
            try:
                if commands[i].HasField("create"):
                    validation.validate_create(commands[i].create.request, self._models)
                else:
                    validation.validate_batch(commands[i].batch_create.requests, self._models)
                valid.append(i)
            except Exception as exc:
                answers[i] = _refusal(exc)[0]
        traces = [tracing.child(commands[i].traceparent) for i in valid]
        batches = [
            [(commands[i].create.request, tp)]
            if commands[i].HasField("create")
            else [(one, tp) for one in commands[i].batch_create.requests]
            for i, tp in zip(valid, traces, strict=True)
        ]
        askers = [_asker(commands[i]) for i in valid]
        made = (
            await _together(self._store.create_each(tenant, batches, askers), len(batches)) if batches else []
        )
        created = False
        for i, result in zip(valid, made, strict=True):
            if isinstance(result, spb.StoreAnswer):
                answers[i] = result
                continue
            created = created or any(new for _, new in result)
            if commands[i].HasField("create"):
                answers[i] = spb.StoreAnswer(create=spb.CreateTaskResponse(task=result[0][0]))
            else:
                answers[i] = spb.StoreAnswer(
                    batch_create=spb.BatchCreateTasksResponse(tasks=[task for task, _ in result])
                )
        if created:
            self._created()
        for i, traceparent in zip(valid, traces, strict=True):
            _log_finished(
                _COMMAND_NAMES[commands[i].WhichOneof("command") or ""], answers[i], traceparent, start
            )

    async def _work(
        self, commands: Sequence[spb.StoreCommand], group: list[int], answers: list[spb.StoreAnswer]
    ) -> None:
        """A worker's claims, progress reports and outcomes in one transaction; each answered
        (and logged) as its own unary RPC would be: a refusal (a stale attempt) is its alone."""
        start = time.perf_counter()
        kinds = [commands[i].WhichOneof("command") or "" for i in group]
        requests: list[WorkerRequest] = [
            getattr(commands[i], kind) for i, kind in zip(group, kinds, strict=True)
        ]
        # (mypy infers object for a union answered through _together's type variable)
        made = cast(
            list[WorkerAnswer | spb.StoreAnswer],
            await _together(self._store.worker_each(requests), len(requests)),
        )
        for i, kind, result in zip(group, kinds, made, strict=True):
            answers[i] = result if isinstance(result, spb.StoreAnswer) else self._worker_answer(result)
            _log_finished(_COMMAND_NAMES[kind], answers[i], commands[i].traceparent, start)

    def _worker_answer(self, result: WorkerAnswer) -> spb.StoreAnswer:
        """A worker command's result as the answer its unary RPC gives."""
        if isinstance(result, ClaimResult):
            return spb.StoreAnswer(claim=self._claimed(result))
        if isinstance(result, tuple):
            outcome, delay, task = result
            fail = spb.FailTaskResponse(outcome=outcome, retry_delay_seconds=delay, task=task)  # type: ignore[arg-type]
            return spb.StoreAnswer(fail=fail)
        if isinstance(result, int):
            return spb.StoreAnswer(progress=spb.ReportProgressResponse(status=result))  # type: ignore[arg-type]
        return spb.StoreAnswer(complete=spb.CompleteTaskResponse(task=result))

    async def _decide(self, command: spb.StoreCommand, kind: str | None, context: Context) -> spb.StoreAnswer:
        """The command as its unary RPC."""
        if kind == "create":
            return spb.StoreAnswer(create=await self.CreateTask(command.create, context))
        if kind == "batch_create":
            return spb.StoreAnswer(batch_create=await self.BatchCreateTasks(command.batch_create, context))
        if kind == "claim":
            return spb.StoreAnswer(claim=await self.ClaimTask(command.claim, context))
        if kind == "progress":
            return spb.StoreAnswer(progress=await self.ReportProgress(command.progress, context))
        if kind == "complete":
            return spb.StoreAnswer(complete=await self.CompleteTask(command.complete, context))
        if kind == "fail":
            return spb.StoreAnswer(fail=await self.FailTask(command.fail, context))
        if kind == "webhook_claim":
            claim = await self.ClaimWebhookDelivery(command.webhook_claim, context)
            return spb.StoreAnswer(webhook_claim=claim)
        if kind == "webhook_settle":
            settle = await self.SettleWebhookDelivery(command.webhook_settle, context)
            return spb.StoreAnswer(webhook_settle=settle)
        raise RequestInvalidError([Violation("commands.command", "must be set")])

    # -- webhooks ----------------------------------------------------------------------------
    def _wake(self, queued: int) -> None:
        if queued and self._on_created is not None:
            self._on_created()  # the relay publishes the deliveries now due

    async def GetWebhookSecret(
        self, request: spb.GetWebhookSecretRequest, context: Context
    ) -> spb.GetWebhookSecretResponse:
        secret = await self._store.webhooks.secrets.current(request.tenant)
        return spb.GetWebhookSecretResponse(response=tpb.GetWebhookSecretResponse(secret=secret))

    async def RotateWebhookSecret(
        self, request: spb.RotateWebhookSecretRequest, context: Context
    ) -> spb.RotateWebhookSecretResponse:
        return spb.RotateWebhookSecretResponse(
            response=await self._store.webhooks.secrets.rotate(request.tenant)
        )

    async def ListWebhookDeliveries(
        self, request: spb.ListWebhookDeliveriesRequest, context: Context
    ) -> spb.ListWebhookDeliveriesResponse:
        page = await self._store.webhooks.list_deliveries(request.tenant, request.request)
        return spb.ListWebhookDeliveriesResponse(response=page)

    async def RedeliverWebhook(
        self, request: spb.RedeliverWebhookRequest, context: Context
    ) -> spb.RedeliverWebhookResponse:
        count, queued = await self._store.webhooks.redeliver(request.tenant, request.request)
        self._wake(queued)
        return spb.RedeliverWebhookResponse(response=tpb.RedeliverWebhookResponse(redelivered=count))

    async def ClaimWebhookDelivery(
        self, request: spb.ClaimWebhookDeliveryRequest, context: Context
    ) -> spb.ClaimWebhookDeliveryResponse:
        return await self._store.webhooks.claim(request.delivery_id, request.sender_id)

    async def SettleWebhookDelivery(
        self, request: spb.SettleWebhookDeliveryRequest, context: Context
    ) -> spb.SettleWebhookDeliveryResponse:
        response, queued = await self._store.webhooks.settle(request)
        self._wake(queued)
        return response


def internal_auth(token: str) -> Any:
    """Authenticator for the internal port: callers present the shared ``CHARAI_INTERNAL_TOKEN``."""
    import hmac

    def check(metadata: dict[str, str], method: str) -> str:
        if not token:
            return "internal"
        presented = metadata.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise UnauthenticatedError("the internal API needs the CHARAI_INTERNAL_TOKEN bearer token")
        return "internal"

    return check
