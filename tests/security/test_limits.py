"""Limits, each with a clear error naming it: message size (gRPC, gRPC-web, REST), prompt and
text length, metadata count and size, open watch streams per tenant and per gateway, and
submissions per tenant per second (a token bucket shared by every transport).

One in-process stack with small limits: 4 watch streams per tenant, 6 per gateway, and 30
submissions at once then one per two seconds. The rate test has a stack of its own whose gateway
runs on a ManualClock: no token comes back unless the test moves the clock, so it checks the
bucket's arithmetic exactly (the burst and not one more; one token per 1/rate seconds), however
fast or slow the machine runs the test.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from charai.core import validation
from charai.core.clock import ManualClock
from charai.taskapi import status_details
from charai.tasks.v1 import task_service_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from tests.conftest import eventually
from tests.security.harness import (
    SERVICE,
    TENANT_A,
    TOKEN_A,
    TOKEN_B,
    Answer,
    Charai,
    bearer,
    grpc_stream_first,
    grpc_unary,
    grpcweb,
    image_request,
    running_charai,
    tts_request,
)

PER_TENANT, PER_GATEWAY = 4, 6
RATE, BURST = 0.5, 30
TOKEN_C, TENANT_C = f"tok-c-{uuid.uuid4().hex}", "tenant-c"
MiB = 1024 * 1024


LIMITS = {
    "max_watch_streams": PER_GATEWAY,
    "max_watch_streams_per_tenant": PER_TENANT,
    "submit_rate_per_tenant": RATE,
    "submit_burst_per_tenant": BURST,
    "api_keys": SecretStr(f"{TOKEN_A}={TENANT_A},{TOKEN_B}=tenant-b,{TOKEN_C}={TENANT_C}"),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Charai]:
    async with running_charai(Path(tmp_path_factory.mktemp("limits")), gateway=LIMITS) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def on_clock(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Charai, ManualClock]]:
    """The same limits on a gateway whose clock moves only when the test says so."""
    clock = ManualClock()
    async with running_charai(
        Path(tmp_path_factory.mktemp("rate")), gateway=LIMITS, gateway_clock=clock
    ) as running:
        yield running, clock


def detail(status: status_pb2.Status | None, cls: type[Any]) -> Any:
    assert status is not None, "no google.rpc.Status details"
    for packed in status.details:
        if packed.Is(cls.DESCRIPTOR):
            message = cls()
            packed.Unpack(message)
            return message
    raise AssertionError(f"no {cls.__name__} among the details")


def violations(answer: Answer) -> dict[str, str]:
    assert answer.details is not None, "no google.rpc.Status details"
    return dict(status_details(answer.details).field_violations)


# -- message size -----------------------------------------------------------------------------


def refused_for_size(answer: Answer) -> None:
    """RESOURCE_EXHAUSTED naming the message limit (ErrorInfo and QuotaFailure)."""
    assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    info = detail(answer.details, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["limit"]) == ("LIMIT_EXCEEDED", "message_bytes"), info
    assert info.metadata["max_bytes"] == str(4 * MiB) and str(4 * MiB) in answer.message
    assert detail(answer.details, error_details_pb2.QuotaFailure).violations[0].subject == "request"


async def test_a_grpc_message_over_4_mib_is_resource_exhausted_naming_the_limit(charai: Charai) -> None:
    huge = image_request(prompt="x" * (9 * MiB // 2))
    refused_for_size(await grpc_unary(charai.channel, "CreateTask", huge, bearer(TOKEN_A)))
    # Before anything else, as gRPC's own limit would be: without a token too.
    refused_for_size(await grpc_unary(charai.channel, "CreateTask", huge))
    # A server stream's request alike.
    watch = task_service_pb2.WatchTaskRequest(id="x" * (9 * MiB // 2))
    refused_for_size(await grpc_stream_first(charai.channel, "WatchTask", watch, bearer(TOKEN_A)))
    # Over 5 MiB gRPC itself refuses the message (no details).
    beyond = await grpc_unary(charai.channel, "CreateTask", image_request(prompt="x" * (6 * MiB)))
    assert beyond.code == grpc.StatusCode.RESOURCE_EXHAUSTED, beyond
    assert await grpc_health(charai) == "SERVING"


async def test_oversized_grpc_web_bodies_are_resource_exhausted(charai: Charai) -> None:
    # Up to the bridge's 7 MiB (text mode spends 4 bytes per 3) a message gets what native gRPC
    # answers: named past 4 MiB (up to gRPC's own 5 MiB); 12 MiB never leaves the bridge.
    for size in (9 * MiB // 2, 19 * MiB // 4):
        request = image_request(prompt="x" * size)
        refused_for_size(await grpcweb(charai.http, charai.base, "CreateTask", request, TOKEN_A))
    answer = await grpcweb(
        charai.http, charai.base, "CreateTask", image_request(prompt="x" * (12 * MiB)), TOKEN_A
    )
    assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    assert await grpc_health(charai) == "SERVING"


async def test_a_rest_body_over_12_mib_is_413(charai: Charai) -> None:
    body = json.dumps({"type": "image_generation", "payload": {"prompt": "x" * (13 * MiB)}}).encode()
    async with charai.http.post(
        f"{charai.base}/api/tasks",
        data=io.BytesIO(body),
        headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        error = (await resp.json())["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED" and str(12 * MiB) in error["message"]


async def grpc_health(charai: Charai) -> str:
    reply = await health_pb2_grpc.HealthStub(charai.channel).Check(health_pb2.HealthCheckRequest())
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# -- field limits -----------------------------------------------------------------------------


async def test_prompt_text_and_metadata_limits_name_the_field(charai: Charai) -> None:
    cases: list[tuple[task_service_pb2.CreateTaskRequest, str, str]] = [
        (image_request(prompt="a" * (validation.MAX_PROMPT_CHARS + 1)), "image.prompt", "4000 characters"),
        # (MAX_PROMPT_BYTES is 4 x MAX_PROMPT_CHARS, so the byte cap cannot bind before the
        # character cap does: 4000 four-byte characters are exactly 16,000 bytes.)
        (image_request(prompt="🧙" * (validation.MAX_PROMPT_CHARS + 1)), "image.prompt", "4000 characters"),
        (tts_request(text="b" * (validation.MAX_TTS_TEXT_CHARS + 1)), "tts.text", "1024 characters"),
        (tts_request(text="nul\x00inside"), "tts.text", "control characters"),
    ]
    many = tts_request()
    many.metadata.update({f"k{i}": "v" for i in range(validation.MAX_METADATA_ENTRIES + 1)})
    cases.append((many, "metadata", "at most 32 entries"))
    big = tts_request()
    big.metadata.update({f"k{i}": "v" * 500 for i in range(20)})
    cases.append((big, "metadata", "8192 bytes"))
    long_value = tts_request()
    long_value.metadata["note"] = "v" * (validation.MAX_METADATA_VALUE_CHARS + 1)
    cases.append((long_value, "metadata[note]", "512 characters"))
    for request, field, words in cases:
        answer = await grpc_unary(charai.channel, "CreateTask", request, bearer(TOKEN_A))
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (field, answer)
        found = violations(answer)
        assert field in found and words in found[field], (field, found)


# -- watch streams ----------------------------------------------------------------------------


async def open_watch(charai: Charai, task_id: str, token: str) -> grpc.aio.UnaryStreamCall[bytes, bytes]:
    """A WatchTask stream that is open on the gateway (its first message has arrived)."""
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = charai.channel.unary_stream(
        f"{SERVICE}/WatchTask"
    )
    call = watch(task_service_pb2.WatchTaskRequest(id=task_id).SerializeToString(), metadata=bearer(token))
    first = await call.read()
    assert first is not grpc.aio.EOF, await call.details()
    return call


async def test_watch_streams_per_tenant_and_per_gateway(charai: Charai) -> None:
    a_task = task_service_pb2.CreateTaskResponse.FromString(
        (await grpc_unary(charai.channel, "CreateTask", tts_request(), bearer(TOKEN_A))).messages[0]
    ).task
    b_task = task_service_pb2.CreateTaskResponse.FromString(
        (await grpc_unary(charai.channel, "CreateTask", tts_request(), bearer(TOKEN_B))).messages[0]
    ).task
    held = [await open_watch(charai, a_task.id, TOKEN_A) for _ in range(PER_TENANT)]
    try:
        assert await charai.open_streams() == PER_TENANT
        # Tenant A's next stream is refused on every transport, naming the per-tenant limit.
        request = task_service_pb2.WatchTaskRequest(id=a_task.id)
        over = await grpc_stream_first(charai.channel, "WatchTask", request, bearer(TOKEN_A))
        assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CHARAI_MAX_WATCH_STREAMS_PER_TENANT" in over.message
        info = status_details(over.details)
        assert (info.reason, info.metadata["limit"]) == ("LIMIT_EXCEEDED", "max_watch_streams_per_tenant")
        quota = detail(over.details, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == f"tenant:{TENANT_A}"
        web = await grpcweb(charai.http, charai.base, "WatchTask", request, TOKEN_A, first_only=True)
        assert web.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "PER_TENANT" in web.message
        async with charai.http.get(
            f"{charai.base}/api/tasks/{a_task.id}/events", headers={"Authorization": f"Bearer {TOKEN_A}"}
        ) as resp:
            assert resp.status == 429
            assert "CHARAI_MAX_WATCH_STREAMS_PER_TENANT" in (await resp.json())["error"]["message"]
        # Tenant B still may, until the gateway as a whole is full.
        held += [await open_watch(charai, b_task.id, TOKEN_B) for _ in range(PER_GATEWAY - PER_TENANT)]
        over_b = await grpc_stream_first(
            charai.channel, "WatchTasks", task_service_pb2.WatchTasksRequest(), bearer(TOKEN_B)
        )
        assert over_b.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CHARAI_MAX_WATCH_STREAMS)" in over_b.message
        assert status_details(over_b.details).metadata["limit"] == "max_watch_streams"
        assert await charai.open_streams() == PER_GATEWAY
    finally:
        for call in held:
            call.cancel()
    await eventually(lambda: charai.open_streams_is(0), timeout=5)
    # Freed slots are usable again.
    again = await open_watch(charai, a_task.id, TOKEN_A)
    again.cancel()
    await eventually(lambda: charai.open_streams_is(0), timeout=5)


# -- submissions per tenant per second ------------------------------------------------------


async def test_submission_rate_limit_is_per_tenant_and_shared_by_every_transport(
    on_clock: tuple[Charai, ManualClock],
) -> None:
    charai, clock = on_clock
    metadata = bearer(TOKEN_C)

    async def submit() -> Answer:
        return await grpc_unary(charai.channel, "CreateTask", tts_request(), metadata)

    answers = await asyncio.gather(*(submit() for _ in range(BURST)))
    assert [a.code for a in answers] == [grpc.StatusCode.OK] * BURST  # a fresh bucket holds the burst
    # The clock stands still: nothing refills, so the burst is all there is.
    refused = await submit()
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "CHARAI_SUBMIT_RATE_PER_TENANT" in refused.message and "0.5 per second" in refused.message
    info = status_details(refused.details)
    assert (info.reason, info.metadata["limit"]) == ("LIMIT_EXCEEDED", "submit_rate_per_tenant")
    quota = detail(refused.details, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == f"tenant:{TENANT_C}"
    assert info.retry_after == pytest.approx(1 / RATE)  # an empty bucket: one token's refill time
    # Invalid requests count too (limited before they are validated), and the bucket is the
    # tenant's whatever the transport: gRPC-web and REST are refused as well.
    invalid = await grpc_unary(charai.channel, "CreateTask", tts_request(text=""), metadata)
    assert invalid.code == grpc.StatusCode.RESOURCE_EXHAUSTED, invalid
    web = await grpcweb(charai.http, charai.base, "CreateTask", tts_request(), TOKEN_C)
    assert web.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "SUBMIT_RATE" in web.message
    assert detail(web.details, error_details_pb2.RetryInfo).HasField("retry_delay")
    body = {
        "type": "tts_generation",
        "payload": {"characterId": "c1", "text": "hi", "voiceStyle": "tongtong"},
    }
    async with charai.http.post(
        f"{charai.base}/api/tasks", json=body, headers={"Authorization": f"Bearer {TOKEN_C}"}
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        error = (await resp.json())["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED" and error["reason"] == "LIMIT_EXCEEDED"
    # Another tenant has a bucket of its own.
    other = await grpc_unary(charai.channel, "CreateTask", tts_request(), bearer(TOKEN_B))
    assert other.code == grpc.StatusCode.OK
    # Half the wait refills half a token: still refused, told to wait the other half.
    delay = status_details((await submit()).details).retry_after
    assert delay is not None
    assert delay == pytest.approx(1 / RATE)
    clock.advance(delay / 2)
    early = await submit()
    assert early.code == grpc.StatusCode.RESOURCE_EXHAUSTED, early.message
    rest = status_details(early.details).retry_after
    assert rest is not None
    assert rest == pytest.approx(delay / 2)
    # Waiting as told is enough, for one submission.
    clock.advance(delay / 2)
    later = await submit()
    assert later.code == grpc.StatusCode.OK, later.message
    assert (await submit()).code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_bucket_refills_at_its_rate_and_caps_at_its_burst() -> None:
    from charai.gateway.limits import QuotaExceededError, SubmitLimiter

    now = [100.0]
    limiter = SubmitLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("t")
    with pytest.raises(QuotaExceededError) as refused:
        limiter.acquire("t")
    assert refused.value.retry_after == pytest.approx(0.5)
    now[0] += 0.5
    limiter.acquire("t")  # one token back after 1/rate
    now[0] += 3600  # a long idle time refills to the burst, not beyond
    for _ in range(3):
        limiter.acquire("t")
    with pytest.raises(QuotaExceededError):
        limiter.acquire("t")
    SubmitLimiter(rate=0, burst=1).acquire("anyone")  # 0 = no limit
