"""Scoped access tokens, the contract table on every transport: native gRPC, binary gRPC-web and
REST/SSE (``?access_token=`` on the SSE routes).

A backend (tenant A's API key) asks CreateAccessToken for a token reaching ``characterId=
char_001`` with ``allow_create``; with it a browser may create, get, list, watch and cancel that
character's tasks, and nothing else: another character's task is NOT_FOUND (no existence leak),
calls outside the scope are PERMISSION_DENIED, an expired or forged token is UNAUTHENTICATED
with the reason in ErrorInfo. The gateway runs on a clock the test moves, so expiry needs no
sleep.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from charai.core.clock import ManualClock
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from tests.security.harness import (
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

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
HTTP_CODES = {200: OK, 201: OK, 204: OK, 400: INVALID, 401: UNAUTHENTICATED, 403: DENIED, 404: NOT_FOUND}
CLOCK = ManualClock(start=time.time())


@dataclasses.dataclass
class World:
    """The stack, a token for char_001 (with create), and tasks to aim at."""

    charai: Charai
    token: str
    mine: task_pb2.Task  # char_001, tenant A
    sibling: task_pb2.Task  # char_002, tenant A: outside the token's scope
    foreign: task_pb2.Task  # char_001, tenant B


async def grpc_ok(charai: Charai, method: str, request: Any, token: str) -> Any:
    answer = await grpc_unary(charai.channel, method, request, bearer(token))
    assert answer.code == OK, answer.message
    return answer.messages[0]


async def create_task(charai: Charai, token: str, character: str) -> task_pb2.Task:
    raw = await grpc_ok(charai, "CreateTask", tts_request(character, f"line of {character}"), token)
    return task_service_pb2.CreateTaskResponse.FromString(raw).task


async def mint(charai: Charai, key: str = TOKEN_A, ttl: float | None = None, **scope: Any) -> str:
    request = task_service_pb2.CreateAccessTokenRequest(**scope)
    if ttl is not None:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
    raw = await grpc_ok(charai, "CreateAccessToken", request, key)
    return str(task_service_pb2.CreateAccessTokenResponse.FromString(raw).token)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with running_charai(Path(tmp_path_factory.mktemp("tokens")), gateway_clock=CLOCK) as charai:
        token = await mint(charai, metadata={"characterId": "char_001"}, allow_create=True)
        yield World(
            charai,
            token,
            await create_task(charai, TOKEN_A, "char_001"),
            await create_task(charai, TOKEN_A, "char_002"),
            await create_task(charai, TOKEN_B, "char_001"),
        )


# -- one call, three transports ---------------------------------------------------------------
Call = Callable[[World, str, str, Any], Awaitable[Answer]]
#: REST route of each RPC: (verb, path with {id}, body builder or None).
REST = {
    "CreateTask": ("POST", "/api/tasks"),
    "GetTask": ("GET", "/api/tasks/{id}"),
    "ListTasks": ("GET", "/api/tasks"),
    "CancelTask": ("POST", "/api/tasks/{id}/cancel"),
    "DeleteTask": ("DELETE", "/api/tasks/{id}"),
    "CreateAccessToken": ("POST", "/api/access-tokens"),
    "WatchTask": ("GET", "/api/tasks/{id}/events"),
    "WatchTasks": ("GET", "/api/tasks/events"),
}
STREAMS = {"WatchTask", "WatchTasks"}
#: WatchTasks called with raw bytes (the streaming tests below read what the gateway sends as is).
WATCH_TASKS = "/charai.tasks.v1.TaskService/WatchTasks"


async def via_grpc(world: World, method: str, token: str, request: Any) -> Answer:
    if method in STREAMS:
        return await grpc_stream_first(world.charai.channel, method, request, bearer(token))
    return await grpc_unary(world.charai.channel, method, request, bearer(token))


async def via_grpcweb(world: World, method: str, token: str, request: Any) -> Answer:
    charai = world.charai
    return await grpcweb(charai.http, charai.base, method, request, token, first_only=method in STREAMS)


async def via_rest(world: World, method: str, token: str, request: Any) -> Answer:
    """The REST route of ``method``; the SSE routes take the token as ``?access_token=`` (what an
    EventSource does), the others as a bearer header."""
    verb, path = REST[method]
    query: dict[str, str] = {}
    body: Any = None
    if hasattr(request, "id"):
        path = path.replace("{id}", request.id)
    if method == "CreateTask":
        body = {
            "type": "tts_generation",
            "payload": {"characterId": request.tts.character_id, "text": "hi", "voiceStyle": "tongtong"},
        }
    elif method == "CreateAccessToken":
        body = {"metadata": dict(request.metadata), "allowCreate": request.allow_create}
    elif method in {"ListTasks", "WatchTasks"}:
        query = {f"metadata.{k}": v for k, v in request.metadata.items()}
    headers = {"Authorization": f"Bearer {token}"}
    if method in STREAMS:
        headers = {}
        query["access_token"] = token
    url = f"{world.charai.base}{path}?{urllib.parse.urlencode(query)}"
    async with world.charai.http.request(verb, url, json=body, headers=headers) as resp:
        if method in STREAMS and resp.status == 200:
            first = await resp.content.readuntil(b"\n\n")  # "retry: …" then the first event
            first += await resp.content.readuntil(b"\n\n")
            return Answer(OK, "", [first], http_status=200)
        raw = await resp.read()
        payload = json.loads(raw) if raw and resp.content_type == "application/json" else None
        if resp.status >= 300:
            error = (payload or {}).get("error", {})
            return Answer(
                HTTP_CODES[resp.status], error.get("message", ""), [], http_status=resp.status, rest=error
            )
        return Answer(OK, "", [raw], http_status=resp.status)


TRANSPORTS: dict[str, Call] = {"grpc": via_grpc, "grpc-web": via_grpcweb, "rest": via_rest}


def reason_of(answer: Answer) -> str:
    """The ErrorInfo reason of a refusal (google.rpc detail, or the REST body's ``reason``)."""
    if answer.rest is not None:
        return str(answer.rest.get("reason", ""))
    for detail in answer.details.details if answer.details is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)  # google.rpc has no stubs: info is Any
    return ""


def tasks_of(answer: Answer, transport: str) -> list[str]:
    if transport == "rest":
        return [t["id"] for t in json.loads(answer.messages[0])]
    return [t.id for t in task_service_pb2.ListTasksResponse.FromString(answer.messages[0]).tasks]


# -- the table ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    request: Callable[[World], Any]
    code: grpc.StatusCode
    reason: str = ""
    rest: bool = True  # the route exists over REST


ROWS: dict[str, Row] = {
    "create inside the scope": Row("CreateTask", lambda w: tts_request("char_001"), OK),
    "create for another character": Row(
        "CreateTask", lambda w: tts_request("char_002"), DENIED, "ACCESS_TOKEN_SCOPE"
    ),
    "get a task in scope": Row("GetTask", lambda w: task_service_pb2.GetTaskRequest(id=w.mine.id), OK),
    "get another character's task": Row(
        "GetTask", lambda w: task_service_pb2.GetTaskRequest(id=w.sibling.id), NOT_FOUND
    ),
    "get another tenant's task": Row(
        "GetTask", lambda w: task_service_pb2.GetTaskRequest(id=w.foreign.id), NOT_FOUND
    ),
    "list within the scope": Row("ListTasks", lambda w: task_service_pb2.ListTasksRequest(), OK),
    "list another character": Row(
        "ListTasks", lambda w: task_service_pb2.ListTasksRequest(metadata={"characterId": "char_002"}), DENIED
    ),
    "watch a task in scope": Row("WatchTask", lambda w: task_service_pb2.WatchTaskRequest(id=w.mine.id), OK),
    "watch another character's task": Row(
        "WatchTask", lambda w: task_service_pb2.WatchTaskRequest(id=w.sibling.id), NOT_FOUND
    ),
    "watch the scope": Row("WatchTasks", lambda w: task_service_pb2.WatchTasksRequest(), OK),
    "watch another character": Row(
        "WatchTasks",
        lambda w: task_service_pb2.WatchTasksRequest(metadata={"characterId": "char_002"}),
        DENIED,
    ),
    "cancel another character's task": Row(
        "CancelTask", lambda w: task_service_pb2.CancelTaskRequest(id=w.sibling.id), NOT_FOUND
    ),
    "delete a task": Row(
        "DeleteTask", lambda w: task_service_pb2.DeleteTaskRequest(id=w.mine.id), DENIED, "ACCESS_TOKEN_SCOPE"
    ),
    "queue statistics": Row(
        "GetQueueStats",
        lambda w: task_service_pb2.GetQueueStatsRequest(),
        DENIED,
        "ACCESS_TOKEN_SCOPE",
        rest=False,
    ),
    "usage and budgets": Row(
        "GetUsage",
        lambda w: task_service_pb2.GetUsageRequest(),
        DENIED,
        "ACCESS_TOKEN_SCOPE",
        rest=False,
    ),
    "re-run a task": Row(
        "RetryTask",
        lambda w: task_service_pb2.RetryTaskRequest(id=w.mine.id),
        DENIED,
        "ACCESS_TOKEN_SCOPE",
        rest=False,
    ),
    "another token": Row(
        "CreateAccessToken",
        lambda w: task_service_pb2.CreateAccessTokenRequest(
            metadata={"characterId": "char_001"}, allow_create=True
        ),
        DENIED,
        "ACCESS_TOKEN_SCOPE",
    ),
}
CASES = [(t, r) for t in TRANSPORTS for r in ROWS if t != "rest" or ROWS[r].rest]


@pytest.mark.parametrize(("transport", "row"), CASES, ids=[f"{t}: {r}" for t, r in CASES])
async def test_the_token_reaches_its_scope_and_nothing_else(world: World, transport: str, row: str) -> None:
    spec = ROWS[row]
    answer = await TRANSPORTS[transport](world, spec.method, world.token, spec.request(world))
    assert answer.code == spec.code, (answer.code, answer.message)
    if spec.reason:
        assert reason_of(answer) == spec.reason
    if spec.method == "ListTasks" and spec.code == OK:
        listed = tasks_of(answer, transport)
        assert world.mine.id in listed
        assert world.sibling.id not in listed and world.foreign.id not in listed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancel_in_scope_goes_through(world: World, transport: str) -> None:
    task = await create_task(world.charai, TOKEN_A, "char_001")
    answer = await TRANSPORTS[transport](
        world, "CancelTask", world.token, task_service_pb2.CancelTaskRequest(id=task.id)
    )
    assert answer.code == OK, answer.message


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_expired_or_forged_token_is_unauthenticated_with_its_reason(
    world: World, transport: str
) -> None:
    short = await mint(world.charai, ttl=60, metadata={"characterId": "char_001"})
    request = task_service_pb2.GetTaskRequest(id=world.mine.id)
    call = TRANSPORTS[transport]
    assert (await call(world, "GetTask", short, request)).code == OK
    CLOCK.advance(61)
    expired = await call(world, "GetTask", short, request)
    assert (expired.code, reason_of(expired)) == (UNAUTHENTICATED, "ACCESS_TOKEN_EXPIRED")
    watch = await call(world, "WatchTask", short, task_service_pb2.WatchTaskRequest(id=world.mine.id))
    assert (watch.code, reason_of(watch)) == (UNAUTHENTICATED, "ACCESS_TOKEN_EXPIRED")
    head, body, sig = world.token.split(".")
    forged = f"{head}.{body}.{sig[:-2]}{'AA' if not sig.endswith('AA') else 'BB'}"
    refused = await call(world, "GetTask", forged, request)
    assert (refused.code, reason_of(refused)) == (UNAUTHENTICATED, "ACCESS_TOKEN_INVALID")


async def test_a_token_naming_tasks_reaches_those_tasks_only(world: World) -> None:
    token = await mint(world.charai, task_ids=[world.sibling.id])
    for call in TRANSPORTS.values():
        assert (
            await call(world, "GetTask", token, task_service_pb2.GetTaskRequest(id=world.sibling.id))
        ).code == OK
        assert (
            await call(world, "GetTask", token, task_service_pb2.GetTaskRequest(id=world.mine.id))
        ).code == NOT_FOUND
        create = await call(world, "CreateTask", token, tts_request("char_002"))
        assert create.code == DENIED
    listed = await via_grpc(world, "ListTasks", token, task_service_pb2.ListTasksRequest())
    assert tasks_of(listed, "grpc") == [world.sibling.id]


def field_of(answer: Answer) -> list[str]:
    assert answer.details is not None, answer
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in answer.details.details if d.Is(bad.DESCRIPTOR)), answer
    return [v.field for v in bad.field_violations]


async def test_a_request_id_replayed_with_a_token_answers_only_a_task_within_its_scope(world: World) -> None:
    # The backend made char_002's line with request_id "order-42"; the char_001 token replaying
    # that id got char_002's task, its text and its media URL (a direct GetTask was NOT_FOUND).
    charai, token = world.charai, world.token
    await grpc_ok(
        charai, "CreateTask", tts_request("char_002", "a secret line", request_id="order-42"), TOKEN_A
    )
    listed = task_service_pb2.ListTasksRequest(metadata={"characterId": "char_001"}, page_size=500)
    before = task_service_pb2.ListTasksResponse.FromString(
        await grpc_ok(charai, "ListTasks", listed, TOKEN_A)
    )
    replay = tts_request("char_001", "x", request_id="order-42")
    for transport in ("grpc", "grpc-web"):
        answer = await TRANSPORTS[transport](world, "CreateTask", token, replay)
        assert answer.code == INVALID and field_of(answer) == ["request_id"], (transport, answer)
        assert "char_002" not in answer.message and "secret" not in answer.message
    async with charai.http.post(
        f"{charai.base}/api/tasks",
        json={
            "type": "tts_generation",
            "payload": {"characterId": "char_001", "text": "x", "voiceStyle": "tongtong"},
            "requestId": "order-42",
        },
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        body = await resp.text()
        assert resp.status == 400 and "requestId" in body and "secret" not in body, body
    # In a batch: the whole batch is refused, naming the request; its new task is not kept.
    batch = task_service_pb2.BatchCreateTasksRequest(
        requests=[tts_request("char_001", "new line", request_id="fresh-1"), replay]
    )
    answer = await via_grpc(world, "BatchCreateTasks", token, batch)
    assert answer.code == INVALID and field_of(answer) == ["requests[1].request_id"], answer
    after = task_service_pb2.ListTasksResponse.FromString(await grpc_ok(charai, "ListTasks", listed, TOKEN_A))
    assert [t.id for t in after.tasks] == [t.id for t in before.tasks]
    # A replay of the token's own create, and the tenant key's replay, answer the task as before.
    mine = [
        task_service_pb2.CreateTaskResponse.FromString(
            await grpc_ok(charai, "CreateTask", tts_request("char_001", "mine", request_id="mine-1"), token)
        ).task.id
        for _ in range(2)
    ]
    assert mine[0] == mine[1]
    key = await grpc_ok(charai, "CreateTask", tts_request("char_009", "x", request_id="order-42"), TOKEN_A)
    assert task_service_pb2.CreateTaskResponse.FromString(key).task.metadata["characterId"] == "char_002"


async def test_a_tokens_create_must_name_its_character_in_the_payload_and_callback_too(world: World) -> None:
    # The metadata said char_001 (the scope), the payload or its callback char_002: the task was
    # created, and a backend acting on the callback (signed by the tenant's webhook secret)
    # updated char_002 from a page that only held a char_001 token.
    def aimed(**callback: str) -> Any:
        request = tts_request("char_001", "x", metadata={"characterId": "char_001"})
        request.tts.callback.CopyFrom(task_pb2.Callback(type="character_voice", **callback))
        return request

    other_payload = tts_request("char_002", "x", metadata={"characterId": "char_001"})
    image = image_request("char_001")
    image.image.callback.CopyFrom(task_pb2.Callback(type="character_view", character_id="char_002"))
    for request in (other_payload, aimed(character_id="char_002"), image):
        for transport in ("grpc", "grpc-web"):
            answer = await TRANSPORTS[transport](world, "CreateTask", world.token, request)
            assert (answer.code, reason_of(answer)) == (DENIED, "ACCESS_TOKEN_SCOPE"), (transport, answer)
        batch = task_service_pb2.BatchCreateTasksRequest(requests=[tts_request("char_001", "y"), request])
        assert (await via_grpc(world, "BatchCreateTasks", world.token, batch)).code == DENIED
    # Agreeing everywhere (or the callback silent on the character) is in scope, as before.
    for request in (aimed(character_id="char_001"), aimed()):
        assert (await via_grpc(world, "CreateTask", world.token, request)).code == OK


async def test_minting_is_validated_and_needs_a_tenant_key(world: World) -> None:
    charai = world.charai
    cases = {
        "nothing in scope": (task_service_pb2.CreateAccessTokenRequest(), "task_ids"),
        "create without metadata": (
            task_service_pb2.CreateAccessTokenRequest(task_ids=[world.mine.id], allow_create=True),
            "allow_create",
        ),
        "ttl over the maximum": (
            task_service_pb2.CreateAccessTokenRequest(
                metadata={"characterId": "c"}, ttl=duration_pb2.Duration(seconds=2 * 86_400)
            ),
            "ttl",
        ),
        "not a task id": (task_service_pb2.CreateAccessTokenRequest(task_ids=["../x"]), "task_ids[0]"),
        # Each within its limit, too large together for a header (was a token of 9,767
        # characters that aiohttp refused with a plain 400 wherever it was used).
        "a token too large to carry": (
            task_service_pb2.CreateAccessTokenRequest(
                task_ids=[f"task_{n:032x}" for n in range(100)],
                metadata={f"k{n}": "v" * 500 for n in range(6)},
            ),
            "metadata",
        ),
        # Beyond what a Python timedelta holds (was UNKNOWN, an OverflowError), and negative.
        "ttl beyond any date": (
            task_service_pb2.CreateAccessTokenRequest(
                metadata={"characterId": "c"}, ttl=duration_pb2.Duration(seconds=9 * 10**18)
            ),
            "ttl",
        ),
        "ttl negative": (
            task_service_pb2.CreateAccessTokenRequest(
                metadata={"characterId": "c"}, ttl=duration_pb2.Duration(seconds=-60)
            ),
            "ttl",
        ),
    }
    for why, (request, field) in cases.items():
        answer = await grpc_unary(charai.channel, "CreateAccessToken", request, bearer(TOKEN_A))
        assert answer.code == INVALID, why
        assert answer.details is not None
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in answer.details.details if d.Is(bad.DESCRIPTOR)), why
        assert field in [v.field for v in bad.field_violations], (why, bad)
    # The largest token within the limits one by one that still fits is issued, and works.
    wide = await mint(charai, task_ids=[f"task_{n:032x}" for n in range(99)] + [world.mine.id])
    assert len(wide) <= 6000
    answer = await via_rest(world, "GetTask", wide, task_service_pb2.GetTaskRequest(id=world.mine.id))
    assert answer.code == OK, answer
    nobody = await grpc_unary(
        charai.channel,
        "CreateAccessToken",
        task_service_pb2.CreateAccessTokenRequest(metadata={"a": "b"}),
        [],
    )
    assert nobody.code == UNAUTHENTICATED
    # A token of tenant B does not reach tenant A's tasks, whatever its metadata scope.
    b_token = await mint(charai, key=TOKEN_B, metadata={"characterId": "char_001"})
    answer = await via_grpc(world, "GetTask", b_token, task_service_pb2.GetTaskRequest(id=world.mine.id))
    assert answer.code == NOT_FOUND
    rest = await charai.http.post(
        f"{charai.base}/api/access-tokens",
        json={"metadata": {"characterId": "char_001"}, "ttl": "120s"},
        headers={"Authorization": f"Bearer {TOKEN_A}"},
    )
    body = await rest.json()
    assert rest.status == 201, body
    assert rest.headers["Cache-Control"] == "no-store"
    assert set(body) == {"token", "expireTime"}


async def test_a_watch_with_a_token_carries_only_the_scope(world: World) -> None:
    """A multi-task watch narrowed to the token's scope: events of char_001 only, over gRPC and
    over the SSE route (the EventSource way: ``?access_token=``)."""
    charai = world.charai
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = charai.channel.unary_stream(WATCH_TASKS)
    call = watch(
        task_service_pb2.WatchTasksRequest().SerializeToString(), metadata=bearer(world.token), timeout=30
    )
    url = f"{charai.base}/api/tasks/events?{urllib.parse.urlencode({'access_token': world.token})}"
    async with charai.http.get(url) as sse:
        assert sse.status == 200
        assert sse.headers["Referrer-Policy"] == "no-referrer"
        # Outside the scope first: had they leaked, they would come before the one in scope.
        other = await create_task(charai, TOKEN_A, "char_002")
        theirs = await create_task(charai, TOKEN_B, "char_001")
        mine = await create_task(charai, TOKEN_A, "char_001")
        seen: list[str] = []
        while mine.id not in seen:
            message = await call.read()
            assert isinstance(message, bytes)  # not grpc.aio.EOF: this stream never ends by itself
            event = task_service_pb2.WatchTasksResponse.FromString(message).event
            if event.type != task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
                seen.append(event.task.id)
        sse_seen: list[str] = []
        while mine.id not in sse_seen:
            block = (await sse.content.readuntil(b"\n\n")).decode()
            if "event: heartbeat" in block:
                continue  # the resume point, no task
            for line in block.splitlines():
                if line.startswith("data: "):
                    sse_seen.append(json.loads(line[6:])["taskId"])
    call.cancel()
    assert other.id not in seen and theirs.id not in seen
    assert other.id not in sse_seen and theirs.id not in sse_seen


async def test_an_open_watch_ends_when_its_token_expires(world: World) -> None:
    """A token is checked when a call starts and, on a stream, at every message (heartbeats come
    every half second here): a watch opened with a token does not outlive it."""
    short = await mint(world.charai, ttl=60, metadata={"characterId": "char_001"})
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = world.charai.channel.unary_stream(WATCH_TASKS)
    call = watch(task_service_pb2.WatchTasksRequest().SerializeToString(), metadata=bearer(short), timeout=30)
    assert await call.read() is not grpc.aio.EOF  # open: its first heartbeat
    CLOCK.advance(61)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert ended.value.code() == UNAUTHENTICATED
    assert "expired" in (ended.value.details() or "")


async def test_an_open_sse_feed_ends_with_the_expiry_and_its_reason(world: World) -> None:
    short = await mint(world.charai, ttl=60, metadata={"characterId": "char_001"})
    url = f"{world.charai.base}/api/tasks/events?access_token={short}"
    async with world.charai.http.get(url) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # retry: …
        CLOCK.advance(61)
        text = (await resp.content.read()).decode()  # to the end of the stream
    block = text[text.index("event: error") :]
    error = json.loads(block.split("data: ", 1)[1].split("\n", 1)[0])["error"]
    assert (error["code"], error.get("reason")) == ("UNAUTHENTICATED", "ACCESS_TOKEN_EXPIRED"), error
