"""W3C trace context (OpenTelemetry's propagation format) follows a task from the client call
through the gateway, task_store, the JetStream job and the worker to the provider call."""

from __future__ import annotations

import json
import secrets
import urllib.request

import grpc
from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc


async def test_the_clients_trace_reaches_the_provider_call(stack: Stack, client: CharaiClient) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    text = f"trace me {trace_id[:8]}"
    async with grpc.aio.insecure_channel(stack.gateway_grpc) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        created = await stub.CreateTask(
            task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                tts=task_pb2.TtsPayload(character_id="char_trace", text=text, voice_style="tongtong"),
            ),
            metadata=(("traceparent", f"00-{trace_id}-{span_id}-01"),),
            timeout=10,
        )
    final = [e async for e in client.watch(created.task.id)][-1].task
    assert final.status == task_pb2.TASK_STATUS_COMPLETED

    def logged(name: str, event: str) -> list[dict[str, object]]:
        return [line for line in stack.logs(name) if line.get("event") == event]

    # Every hop logged the same trace id, each as its own span (the id is not the client's span).
    gateway_lines = [x for x in logged("gateway", "rpc_finished") if x.get("rpc") == "CreateTask"]
    assert any(x.get("trace_id") == trace_id for x in gateway_lines)
    # The gateway's creates reach task_store inside Exchange calls: each command logs its own
    # canonical line, with its own trace.
    store_lines = [x for x in logged("task_store", "command_finished") if x.get("command") == "CreateTask"]
    assert any(x.get("trace_id") == trace_id for x in store_lines)
    # The worker logs its canonical line just after the result is stored (the client may be first).
    worker_line = await stack.wait_for_line(
        "tts_worker", "job_finished", 10, where=lambda x: x.get("task_id") == created.task.id
    )
    assert worker_line.get("trace_id") == trace_id
    if worker_line.get("lane") != "pushed":
        # Claimed from a delivered job: the worker's claim, same trace. (A job pushed to an idle
        # worker, WorkerOffer, was claimed inside the CreateTask command above.)
        claims = [x for x in logged("task_store", "command_finished") if x.get("command") == "ClaimTask"]
        assert any(x.get("trace_id") == trace_id for x in claims)
    # The provider saw a traceparent of the same trace with a span of the worker's.
    with urllib.request.urlopen(f"{stack.emulator_url}/_emulator/stats", timeout=10) as response:
        stats = json.loads(response.read())
    version, seen_trace, seen_span, flags = stats["traceparents"][text[:80]].split("-")
    assert (version, seen_trace, flags) == ("00", trace_id, "01")
    assert seen_span != span_id


async def test_a_call_without_trace_context_starts_a_trace(stack: Stack, client: CharaiClient) -> None:
    text = f"untraced {secrets.token_hex(4)}"
    task = await client.create_tts("char_trace", text, voice_style="tongtong")
    final = [e async for e in client.watch(task.id)][-1].task
    assert final.status == task_pb2.TASK_STATUS_COMPLETED
    with urllib.request.urlopen(f"{stack.emulator_url}/_emulator/stats", timeout=10) as response:
        stats = json.loads(response.read())
    _, trace_id, _, _ = stats["traceparents"][text[:80]].split("-")
    worker_line = await stack.wait_for_line(
        "tts_worker", "job_finished", 10, where=lambda x: x.get("task_id") == task.id
    )
    assert len(trace_id) == 32 and worker_line.get("trace_id") == trace_id
