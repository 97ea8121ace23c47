"""Who may do what: bearer authentication on every RPC, stream, REST route and gRPC-web call;
reflection behind the same authentication, health open; tenant isolation on every path; media
capability URLs that work without a header and cannot be tampered with, widened or forged.

One in-process stack with tokens for tenants A and B; the TTS worker (real handler, the emulator
as provider) is started only for the media tests, so the other tasks stay queued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pydantic
import pytest
import pytest_asyncio
from charai.core import settings
from charai.core.media import UrlSigner
from charai.gateway.settings import Settings as GatewaySettings
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import eventually
from tests.security.harness import (
    SIGNING_KEY,
    TOKEN_A,
    TOKEN_B,
    Answer,
    Charai,
    bearer,
    grpc_stream_first,
    grpc_unary,
    grpcweb,
    running_charai,
    tts_request,
)

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Charai]:
    async with running_charai(Path(tmp_path_factory.mktemp("auth")), with_worker=True) as running:
        yield running


async def create(
    charai: Charai, token: str, character_id: str = "char_auth", text: str = "hi"
) -> task_pb2.Task:
    answer = await grpc_unary(charai.channel, "CreateTask", tts_request(character_id, text), bearer(token))
    assert answer.code == OK, answer.message
    return task_service_pb2.CreateTaskResponse.FromString(answer.messages[0]).task


# -- authentication, table-driven ------------------------------------------------------------

#: Authorization values that must be refused, and why.
BAD_CREDENTIALS: dict[str, str | None] = {
    "missing": None,
    "wrong token": "Bearer not-a-token",
    "right token, wrong scheme": f"Basic {TOKEN_A}",
    "right token with a suffix": f"Bearer {TOKEN_A}x",
    "right token cut short": f"Bearer {TOKEN_A[:-1]}",
    "empty bearer": "Bearer ",
    "token without a scheme": TOKEN_A,
}


def metadata_for(authorization: str | None) -> list[tuple[str, str]]:
    return [] if authorization is None else [("authorization", authorization)]


@dataclasses.dataclass(frozen=True)
class Rpc:
    method: str
    streaming: bool
    request: Callable[[str], Message]  # task id -> request
    #: Answers a valid token may get (a method not listed below only must not be refused).
    ok: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.OK})


KNOWN = {
    "CreateTask": lambda _: tts_request(),
    "GetTask": lambda i: task_service_pb2.GetTaskRequest(id=i),
    "ListTasks": lambda _: task_service_pb2.ListTasksRequest(),
    "CancelTask": lambda i: task_service_pb2.CancelTaskRequest(id=i),
    "WatchTask": lambda i: task_service_pb2.WatchTaskRequest(id=i),
    "WatchTasks": lambda _: task_service_pb2.WatchTasksRequest(),
}


def empty_request(cls: type[Message]) -> Callable[[str], Message]:
    """Makes an empty ``cls`` whatever the task id."""
    return lambda _: cls()


def every_rpc() -> list[Rpc]:
    """Every method of TaskService, from its descriptor: an RPC added later is covered at once
    (its request empty, its success not presumed, but it must refuse a bad token)."""
    rpcs = []
    for method in task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].methods:
        if method.name in KNOWN:
            rpcs.append(Rpc(method.name, method.server_streaming, KNOWN[method.name]))
        else:
            empty = message_factory.GetMessageClass(method.input_type)
            anything = frozenset(grpc.StatusCode) - {UNAUTHENTICATED}
            rpcs.append(Rpc(method.name, method.server_streaming, empty_request(empty), anything))
    return rpcs


RPCS = every_rpc()


async def call_rpc(
    charai: Charai, transport: str, rpc: Rpc, task_id: str, authorization: str | None
) -> Answer:
    request = rpc.request(task_id)
    if transport == "grpc":
        if rpc.streaming:
            return await grpc_stream_first(charai.channel, rpc.method, request, metadata_for(authorization))
        return await grpc_unary(charai.channel, rpc.method, request, metadata_for(authorization))
    headers = {} if authorization is None else {"Authorization": authorization}
    return await grpcweb(
        charai.http, charai.base, rpc.method, request, None, first_only=rpc.streaming, headers=headers
    )


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.method)
async def test_every_rpc_needs_a_valid_bearer_token(charai: Charai, transport: str, rpc: Rpc) -> None:
    task = await create(charai, TOKEN_A)
    for why, authorization in BAD_CREDENTIALS.items():
        answer = await call_rpc(charai, transport, rpc, task.id, authorization)
        assert answer.code == UNAUTHENTICATED, f"{why}: {answer.code.name} {answer.message}"
        assert TOKEN_A not in answer.message
    answer = await call_rpc(charai, transport, rpc, task.id, f"Bearer {TOKEN_A}")
    assert answer.code in rpc.ok, answer.message
    lower = await call_rpc(charai, transport, rpc, task.id, f"bearer {TOKEN_A}")  # RFC 7235: any case
    assert lower.code in {*rpc.ok, grpc.StatusCode.FAILED_PRECONDITION}, lower.message  # (cancel twice)


REST_ROUTES: list[tuple[str, str, int]] = [
    ("POST", "/api/tasks", 201),
    ("GET", "/api/tasks", 200),
    ("GET", "/api/tasks/{id}", 200),
    ("POST", "/api/tasks/{id}/cancel", 200),
    ("GET", "/api/tasks/{id}/events", 200),
]
REST_BODY = {
    "type": "tts_generation",
    "payload": {"characterId": "c1", "text": "hi", "voiceStyle": "tongtong"},
}


@pytest.mark.parametrize(("verb", "route", "ok_status"), REST_ROUTES, ids=[r[1] for r in REST_ROUTES])
async def test_every_rest_route_needs_a_valid_bearer_token(
    charai: Charai, verb: str, route: str, ok_status: int
) -> None:
    task = await create(charai, TOKEN_A)
    url = charai.base + route.format(id=task.id)
    body = REST_BODY if verb == "POST" and route == "/api/tasks" else None

    async def send(authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {} if authorization is None else {"Authorization": authorization}
        async with charai.http.request(verb, url, json=body, headers=headers) as resp:
            # An SSE stream of a queued task never ends: read its first block only.
            data = (
                await resp.content.readuntil(b"\n\n")
                if resp.status == 200 and "events" in url
                else await resp.read()
            )
            return resp.status, dict(resp.headers), data

    for why, authorization in BAD_CREDENTIALS.items():
        status, headers, data = await send(authorization)
        assert status == 401, f"{why}: {status} {data[:200]!r}"
        assert headers.get("WWW-Authenticate") == "Bearer"
        assert b'"UNAUTHENTICATED"' in data and TOKEN_A.encode() not in data
    status, _, data = await send(f"Bearer {TOKEN_A}")
    assert status == ok_status, data[:300]


async def test_reflection_needs_the_token_health_does_not(charai: Charai) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(charai.channel)

    async def services(metadata: list[tuple[str, str]]) -> list[str]:
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata
        )
        names = []
        async for response in call:
            names += [s.name for s in response.list_services_response.service]
        return names

    for why, authorization in BAD_CREDENTIALS.items():
        # Refused on its metadata, before any message: read the status without writing (a write
        # racing that refusal fails in grpc's core as INTERNAL instead).
        refused = stub.ServerReflectionInfo(metadata=metadata_for(authorization))
        assert await refused.code() == UNAUTHENTICATED, why
    assert "charai.tasks.v1.TaskService" in await services(bearer(TOKEN_A))
    # Health stays open for load balancers and probes, on both transports.
    reply = await health_pb2_grpc.HealthStub(charai.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with charai.http.post(
        f"{charai.base}/grpc.health.v1.Health/Check",
        data=b"\x00\x00\x00\x00\x00",
        headers={"Content-Type": "application/grpc-web+proto"},
    ) as resp:
        assert resp.status == 200 and (resp.headers.get("grpc-status") in (None, "0"))
    # Reflection over gRPC-web is the same call, so the same rule.
    for token, expected in ((None, UNAUTHENTICATED), ("not-a-token", UNAUTHENTICATED), (TOKEN_A, OK)):
        answer = await reflection_over_grpcweb(charai, token)
        assert answer.code == expected, (token, answer)


async def reflection_over_grpcweb(charai: Charai, token: str | None) -> Any:
    """A reflection call (list the services) over the gateway's gRPC-web port, with ``token``."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return await grpcweb(
        charai.http,
        charai.base,
        "ServerReflectionInfo",
        request,
        token,
        service="/grpc.reflection.v1alpha.ServerReflection",
    )


async def test_a_refused_grpc_web_call_reports_unauthenticated_never_internal(charai: Charai) -> None:
    """A gRPC-web call refused on its metadata answers UNAUTHENTICATED every time. The bridge once
    wrote the request message after the call's metadata, and when the server's refusal won that
    race grpc's client reported INTERNAL ("Internal error from Core") instead (CI met it once)."""

    async def refused(token: str | None) -> Any:
        answer = await reflection_over_grpcweb(charai, token)
        return answer.code, answer.message

    for _ in range(30):
        answers = await asyncio.gather(*(refused(None if i % 2 else "not-a-token") for i in range(50)))
        assert {code for code, _ in answers} == {UNAUTHENTICATED}, answers


def test_without_tokens_the_gateway_refuses_a_public_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in [v for v in os.environ if v.startswith("CHARAI_")]:
        monkeypatch.delenv(var)
    for name, field in (
        ("CHARAI_GATEWAY_GRPC_ADDR", "gateway_grpc_addr"),
        ("CHARAI_GATEWAY_HTTP_ADDR", "gateway_http_addr"),
    ):
        values = {"gateway_grpc_addr": "127.0.0.1:0", "gateway_http_addr": "127.0.0.1:0", field: "0.0.0.0:0"}
        # The policy is part of the settings: nothing is built, nothing connects.
        with pytest.raises(pydantic.ValidationError) as refused:
            GatewaySettings(
                data_dir=tmp_path,
                nats_url="nats://127.0.0.1:1",
                gateway_grpc_addr=values["gateway_grpc_addr"],
                gateway_http_addr=values["gateway_http_addr"],
            )
        message = str(refused.value)
        assert name in message and "CHARAI_API_KEYS" in message and "CHARAI_API_KEYS_FILE" in message
        # As the process reads it: start-up stops with a message naming the settings.
        monkeypatch.setenv(name, "0.0.0.0:0")
        with pytest.raises(SystemExit) as stopped:
            settings.load(GatewaySettings)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert name in err and "CHARAI_API_KEYS" in err and "CHARAI_API_KEYS_FILE" in err
        monkeypatch.delenv(name)
    # With client tokens (inline or from the file), a public address is allowed.
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{TOKEN_A}=tenant-f\n")
    public = {"gateway_grpc_addr": "0.0.0.0:0", "gateway_http_addr": "0.0.0.0:0"}
    for tokens in ({"api_keys_file": keys}, {"api_keys": pydantic.SecretStr(f"{TOKEN_B}=tenant-b")}):
        config = GatewaySettings(data_dir=tmp_path, **public, **tokens)  # type: ignore[arg-type]
        assert len(config.client_tokens) == 1


def test_client_tokens_are_parsed_once_in_the_settings(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n\n  {TOKEN_B} = tenant-file \n")
    config = GatewaySettings(
        data_dir=tmp_path, api_keys=pydantic.SecretStr(f"{TOKEN_A}=tenant-a, "), api_keys_file=keys
    )
    assert [(t.get_secret_value(), tenant) for t, tenant in config.client_tokens] == [
        (TOKEN_A, "tenant-a"),
        (TOKEN_B, "tenant-file"),
    ]
    assert TOKEN_A not in repr(config) and TOKEN_B not in repr(config)
    assert {TOKEN_A, TOKEN_B} <= set(config.secret_values())  # what the log scrubber is given
    for bad in ("just-a-token-7f3a9c", "token-7f3a9c=", "=tenant-7f3a9c"):
        with pytest.raises(pydantic.ValidationError) as refused:
            GatewaySettings(data_dir=tmp_path, api_keys=pydantic.SecretStr(f"{TOKEN_A}=a,{bad}"))
        assert "token=tenant" in str(refused.value)
        assert "7f3a9c" not in str(refused.value) and TOKEN_A not in str(refused.value)
    with pytest.raises(pydantic.ValidationError, match="CHARAI_API_KEYS_FILE"):
        GatewaySettings(data_dir=tmp_path, api_keys_file=tmp_path / "missing")


# -- tenant isolation -------------------------------------------------------------------------


async def test_another_tenant_gets_not_found_everywhere(charai: Charai) -> None:
    mine = await create(charai, TOKEN_A, "char_isolated")
    for rpc in RPCS:
        if rpc.method not in {"GetTask", "CancelTask", "WatchTask"}:
            continue
        for transport in ("grpc", "grpc-web"):
            answer = await call_rpc(charai, transport, rpc, mine.id, f"Bearer {TOKEN_B}")
            assert answer.code == NOT_FOUND, (rpc.method, transport, answer)
    # RetryTask (added alongside this suite) must not tell a foreign task from a missing one
    # either; UNIMPLEMENTED is accepted only until the gateway serves it.
    names = {m.name for m in task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].methods}
    if "RetryTask" in names:
        retry_request = message_factory.GetMessageClass(
            task_service_pb2.DESCRIPTOR.services_by_name["TaskService"]
            .methods_by_name["RetryTask"]
            .input_type
        )(id=mine.id)
        for transport in ("grpc", "grpc-web"):
            retry = Rpc("RetryTask", False, lambda _: retry_request)
            answer = await call_rpc(charai, transport, retry, mine.id, f"Bearer {TOKEN_B}")
            assert answer.code in {NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}, (transport, answer)
    b_headers = {"Authorization": f"Bearer {TOKEN_B}"}
    for verb, route in (
        ("GET", "/api/tasks/{id}"),
        ("POST", "/api/tasks/{id}/cancel"),
        ("GET", "/api/tasks/{id}/events"),
    ):
        async with charai.http.request(
            verb, charai.base + route.format(id=mine.id), headers=b_headers
        ) as resp:
            assert resp.status == 404, (route, await resp.text())
            assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    # B never sees it listed, filtered by its metadata or not (gRPC and REST).
    b_stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    for filters in ({}, {"characterId": "char_isolated"}):
        listed = await b_stub.ListTasks(
            task_service_pb2.ListTasksRequest(metadata=filters, page_size=500), metadata=bearer(TOKEN_B)
        )
        assert mine.id not in {t.id for t in listed.tasks}
    query = urllib.parse.urlencode({"metadata.characterId": "char_isolated"})
    async with charai.http.get(f"{charai.base}/api/tasks?{query}", headers=b_headers) as resp:
        assert resp.status == 200 and await resp.json() == []
    # A's task is untouched by B's cancel.
    still = await grpc_unary(
        charai.channel, "GetTask", task_service_pb2.GetTaskRequest(id=mine.id), bearer(TOKEN_A)
    )
    assert (
        task_service_pb2.GetTaskResponse.FromString(still.messages[0]).task.status
        == task_pb2.TASK_STATUS_QUEUED
    )


async def test_watch_tasks_never_shows_another_tenants_events(charai: Charai) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    request = task_service_pb2.WatchTasksRequest(metadata={"characterId": "char_watched"})
    seen: dict[str, list[str]] = {"a": [], "b": []}
    ready = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def follow(who: str, call: Any) -> None:
        # (One reading style per call: grpc.aio refuses read() mixed with iteration.)
        async for response in call:
            ready[who].set()  # the first heartbeat: the watch is in place
            if response.event.type != task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                seen[who].append(response.event.task.id)

    calls = {
        "a": stub.WatchTasks(request, metadata=bearer(TOKEN_A)),
        "b": stub.WatchTasks(request, metadata=bearer(TOKEN_B)),
    }
    readers = [asyncio.create_task(follow(who, call)) for who, call in calls.items()]
    async with asyncio.timeout(5):
        await asyncio.gather(*(event.wait() for event in ready.values()))

    async def created_and_cancelled(token: str, who: str) -> str:
        """A task of ``token``'s tenant, created and cancelled; returns once ``who``'s stream
        delivered both its events (queued, cancelled)."""
        task = await create(charai, token, "char_watched")
        await grpc_unary(
            charai.channel, "CancelTask", task_service_pb2.CancelTaskRequest(id=task.id), bearer(token)
        )
        await eventually(lambda: seen[who].count(task.id) >= 2, timeout=5)
        return task.id

    try:
        a_task = await created_and_cancelled(TOKEN_A, "a")
        # A stream delivers the log in order: once B's stream has its own later task's events,
        # anything of A's earlier task it were to leak would have come before them.
        b_task = await created_and_cancelled(TOKEN_B, "b")
        assert seen["b"] == [b_task, b_task], seen["b"]
        # And the other way round.
        a_later = await created_and_cancelled(TOKEN_A, "a")
        assert seen["a"] == [a_task, a_task, a_later, a_later], seen["a"]
    finally:
        for call in calls.values():
            call.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# -- media capability URLs --------------------------------------------------------------------


async def wait_completed(charai: Charai, token: str, task_id: str) -> task_pb2.Task:
    stub = task_service_pb2_grpc.TaskServiceStub(charai.channel)
    async for response in stub.WatchTask(
        task_service_pb2.WatchTaskRequest(id=task_id), metadata=bearer(token), timeout=20
    ):
        if response.event.task.status == task_pb2.TASK_STATUS_COMPLETED:
            return response.event.task
        assert response.event.task.status not in {task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_CANCELLED}
    raise AssertionError("the stream ended before the task completed")


def with_query(url: str, **changes: str | None) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def with_key(url: str, key: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/media/{key}"))


async def test_media_urls_are_capabilities_that_cannot_be_tampered_with(charai: Charai) -> None:
    if charai.worker is None:
        await charai.start_worker()
    a_task, b_task = (
        await create(charai, TOKEN_A, text="media of a"),
        await create(charai, TOKEN_B, text="media of b"),
    )
    a_done, b_done = (
        await wait_completed(charai, TOKEN_A, a_task.id),
        await wait_completed(charai, TOKEN_B, b_task.id),
    )
    a_url, b_url = a_done.tts_result.audio_url, b_done.tts_result.audio_url
    a_key, b_key = f"{a_task.id}.wav", f"{b_task.id}.wav"
    assert a_key in a_url and "sig=" in a_url and "exp=" in a_url

    async def fetch(url: str) -> tuple[int, bytes]:
        # A fresh session: no cookies, no headers, what an <audio> element sends.
        async with aiohttp.ClientSession() as fresh, fresh.get(url) as resp:
            return resp.status, await resp.read()

    status, data = await fetch(a_url)
    assert status == 200 and data[:4] == b"RIFF"
    exp = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(a_url).query))["exp"]
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(a_url).query))["sig"]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    signer = UrlSigner(SIGNING_KEY.encode(), 60)
    expired = signer.sign(charai.base, a_key, now=time.time() - 7200)
    refused = {
        "another task's key, A's signature": with_key(a_url, b_key),
        "expiry moved later (widened)": with_query(a_url, exp=str(int(exp) + 10**6)),
        "expiry moved earlier": with_query(a_url, exp=str(int(exp) - 3600)),
        "signature flipped": with_query(a_url, sig=flipped),
        "signature missing": with_query(a_url, sig=None),
        "expiry missing": with_query(a_url, exp=None),
        "expired": expired,
        "B's signature on A's key (forged)": with_query(with_key(b_url, a_key)),
        "signed with a guessed key": UrlSigner(b"charai", 60).sign(charai.base, a_key),
        "extension swapped": with_key(a_url, a_key.replace(".wav", ".png")),
        "traversal in the key": with_key(a_url, "..%2Ftasks.db"),
        "NUL in the key": with_key(a_url, a_key + "%00"),
    }
    for why, url in refused.items():
        status, data = await fetch(url)
        assert status in (403, 404), f"{why}: {status}"
        assert status == 403 or why == "traversal in the key", f"{why}: {status} {data[:100]!r}"
        assert b"RIFF" not in data
    # The same key with a fresh, valid signature works: the refusals above were about the URL.
    status, _ = await fetch(signer.sign(charai.base, a_key))
    assert status == 200
    status, data = await fetch(b_url)  # and B's own link works for B's media
    assert status == 200 and data[:4] == b"RIFF"


async def test_urls_from_the_task_are_signed_for_the_same_media_on_every_read(charai: Charai) -> None:
    # Capability URLs are stable per expiry hour: a client may cache <img src> safely.
    task = await create(charai, TOKEN_A, text="stable url")
    if charai.worker is None:
        await charai.start_worker()
    done = await wait_completed(charai, TOKEN_A, task.id)
    again = await grpc_unary(
        charai.channel, "GetTask", task_service_pb2.GetTaskRequest(id=task.id), bearer(TOKEN_A)
    )
    assert (
        task_service_pb2.GetTaskResponse.FromString(again.messages[0]).task.tts_result.audio_url
        == done.tts_result.audio_url
    )


# -- media keys are the server's --------------------------------------------------------------

HEX = "0123456789abcdef" * 2
HOSTILE_IDS = [
    "../../etc/passwd",
    f"task_{HEX}/../../tasks.db",
    f"task_{HEX}\x00.png",
    f"task_{HEX}.wav",
    f"../task_{HEX}",
    f"TASK_{HEX.upper()}",
    f" task_{HEX}",
    "task_" + "g" * 32,
    "",
]


async def test_client_chosen_ids_never_reach_storage(charai: Charai) -> None:
    from charai.core.media import media_key, valid_key

    for bad in HOSTILE_IDS:
        with pytest.raises(ValueError, match="not a media key"):
            media_key(bad, "wav")
        assert not valid_key(f"{bad}.wav")
        for method, request in (
            ("GetTask", task_service_pb2.GetTaskRequest(id=bad)),
            ("CancelTask", task_service_pb2.CancelTaskRequest(id=bad)),
        ):
            answer = await grpc_unary(charai.channel, method, request, bearer(TOKEN_A))
            assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, method, answer)
            assert "must be a task id" in answer.message
        watched = await grpc_stream_first(
            charai.channel, "WatchTask", task_service_pb2.WatchTaskRequest(id=bad), bearer(TOKEN_A)
        )
        assert watched.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, watched)
    headers = {"Authorization": f"Bearer {TOKEN_A}"}
    for path in (
        "/api/tasks/..%2F..%2Fetc%2Fpasswd",
        f"/api/tasks/task_{HEX}%00",
        f"/media/task_{HEX}.wav%00",
    ):
        async with charai.http.get(charai.base + path, headers=headers) as resp:
            assert resp.status in (400, 403, 404), (path, resp.status)
    # Path-like text where clients may put text is kept as data; the object is named by the task.
    if charai.worker is None:
        await charai.start_worker()
    request = tts_request("..", "../../../../tmp/pwned", request_id="../../../../tmp/pwned")
    request.metadata["path"] = "../../x\\..\\y"
    created = await grpc_unary(charai.channel, "CreateTask", request, bearer(TOKEN_A))
    assert created.code == OK, created.message
    task = task_service_pb2.CreateTaskResponse.FromString(created.messages[0]).task
    done = await wait_completed(charai, TOKEN_A, task.id)
    assert urllib.parse.urlsplit(done.tts_result.audio_url).path == f"/media/{task.id}.wav"
    bucket = await charai.gateway._nc.jetstream().object_store("charai-media")  # type: ignore[union-attr]
    names = [info.name for info in await bucket.list()]
    assert f"{task.id}.wav" in names
    assert all(valid_key(name) for name in names), names
