"""Arbitrary CreateTaskRequests over gRPC and gRPC-web: only OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or UNAUTHENTICATED come back, exactly the valid requests are accepted, the
gateway stays up, and nothing invalid is stored.

Requests are built as protobuf messages with hostile field values (huge and empty strings,
control characters, NUL, bidi overrides, every unicode plane, bad enums, NaN speeds, large
metadata maps) and then, sometimes, made worse on the wire: unknown fields with random bytes,
a string field with bytes that are not UTF-8, or no message at all but random bytes.

The oracle is the validation module itself: the gateway must answer OK exactly when
``validate_create`` accepts what it decoded, so a request slipping past a check, or a valid one
refused, fails the test. Hypothesis runs in a worker thread and hands each call to the test's
event loop, where the stack runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from charai.core import validation
from charai.core.grpcsupport import MAX_MESSAGE_BYTES
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.security.harness import (
    TENANT_A,
    TENANT_B,
    TOKEN_A,
    TOKEN_B,
    Answer,
    Charai,
    bearer,
    grpc_unary,
    grpcweb,
    running_charai,
    tts_request,
)

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
}
EXAMPLES = 150
USED_REQUEST_IDS: set[tuple[str, str]] = set()
TENANT_OF = {TOKEN_A: TENANT_A, TOKEN_B: TENANT_B}
DERIVED = {"characterId": "character_id", "characterName": "character_name", "viewType": "view_type",
           "costumeId": "costume_id"}  # fmt: skip

#: Strings that have broken other systems.
NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x07\x08\x1b[31m",
    "\r\n\t",
    "\x7f",
    "\u202eevil\u202c",
    "\u200b\u200d\ufeff",
    "e\u0301\u0301\u0301",
    "🧙‍♂️👩🏽‍🚀",
    "\uffff\ufffe",
    "\U0010ffff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "../../../etc/passwd",
    "..\\..\\windows",
    "%00%2e%2e%2f",
    "' OR 1=1 --",
    "${jndi:ldap://127.0.0.1/a}",
    "<script>alert(1)</script>",
    "task_" + "0" * 32,
    "1024x1024",
    "1024×1024",
    "99999x99999",
    "tongtong",
    "character_view",
]


def texts(max_size: int) -> st.SearchStrategy[str]:
    """Any text (every category but lone surrogates, which protobuf cannot carry), the nasty
    list, and long runs around each limit (up to past the 1 MiB message cap)."""
    long_run = st.builds(
        lambda unit, n: unit * n,
        st.sampled_from(["a", "字", "🧙", "\x01", "é"]),
        st.sampled_from([64, 65, 128, 129, 200, 201, 512, 513, 1024, 1025, 4000, 4001, 5000, 300_000]),
    )
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=max_size),
        st.text(alphabet="abcxyz_-.:0123456789", min_size=1, max_size=20),
        long_run,
    )


def enums(valid: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(valid), st.integers(-(2**31), 2**31 - 1))


callbacks = st.builds(
    task_pb2.Callback,
    type=texts(40),
    character_id=texts(40),
    view_type=texts(40),
    costume_id=texts(40),
)


@st.composite
def image_payloads(draw: st.DrawFn) -> task_pb2.ImagePayload:
    payload = task_pb2.ImagePayload(
        character_id=draw(texts(40)),
        character_name=draw(texts(80)),
        prompt=draw(texts(200)),
        resolution=draw(st.one_of(texts(20), st.sampled_from(["1024x1024", "1280x960", "2048x2048"]))),
        view_type=draw(texts(20)),
        costume_id=draw(texts(20)),
    )
    if draw(st.booleans()):
        payload.callback.CopyFrom(draw(callbacks))
    return payload


@st.composite
def tts_payloads(draw: st.DrawFn) -> task_pb2.TtsPayload:
    payload = task_pb2.TtsPayload(
        character_id=draw(texts(40)),
        character_name=draw(texts(80)),
        text=draw(texts(200)),
        voice_style=draw(st.one_of(texts(20), st.just("tongtong"))),
        response_format=draw(st.one_of(texts(8), st.sampled_from(["wav", "mp3", "pcm"]))),
    )
    floats = st.floats(allow_nan=True, allow_infinity=True)
    if draw(st.booleans()):
        payload.speed = draw(st.one_of(floats, st.floats(0.5, 2.0)))
    if draw(st.booleans()):
        payload.volume = draw(st.one_of(floats, st.floats(0.1, 10.0)))
    if draw(st.booleans()):
        payload.callback.CopyFrom(draw(callbacks))
    return payload


@st.composite
def create_requests(draw: st.DrawFn) -> task_service_pb2.CreateTaskRequest:
    request = task_service_pb2.CreateTaskRequest(
        type=draw(enums([0, 1, 2])),  # type: ignore[arg-type]
        priority=draw(enums([0, 1, 2, 3])),  # type: ignore[arg-type]
        request_id=draw(texts(40)),
    )
    kind = draw(st.sampled_from(["image", "tts", "none", "matching"]))
    if kind == "matching":  # mostly well-formed, so the accept path is exercised too
        kind = "image" if request.type == task_pb2.TASK_TYPE_IMAGE_GENERATION else "tts"
    if kind == "image":
        request.image.CopyFrom(draw(image_payloads()))
    elif kind == "tts":
        request.tts.CopyFrom(draw(tts_payloads()))
    metadata = draw(
        st.one_of(
            st.dictionaries(texts(70), texts(600), max_size=40),
            st.dictionaries(
                st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True), texts(40), max_size=40
            ),
        )
    )
    request.metadata.update(metadata)
    return request


#: Text a valid request may carry anywhere free text goes: any unicode but control characters.
free_text = st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=300).filter(
    lambda t: bool(t.strip())
)
idents = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> task_service_pb2.CreateTaskRequest:
    """A valid request with hostile but legal content (any script, emoji, bidi marks), and
    sometimes one field swapped for a hostile value: the accept path, and the edge of each rule."""
    if draw(st.booleans()):
        request = task_service_pb2.CreateTaskRequest(
            type=task_pb2.TASK_TYPE_TTS_GENERATION,
            priority=draw(st.sampled_from([0, 1, 2, 3])),  # type: ignore[arg-type]
            tts=task_pb2.TtsPayload(
                character_id=draw(idents),
                character_name=draw(st.one_of(st.just(""), free_text.map(lambda t: t[:200]))),
                text=draw(free_text),
                voice_style=draw(idents),
            ),
        )
        target = request.tts
        fields = ["character_id", "character_name", "text", "voice_style", "response_format"]
    else:
        request = task_service_pb2.CreateTaskRequest(
            type=task_pb2.TASK_TYPE_IMAGE_GENERATION,
            priority=draw(st.sampled_from([0, 1, 2, 3])),  # type: ignore[arg-type]
            image=task_pb2.ImagePayload(
                character_id=draw(idents),
                prompt=draw(free_text),
                resolution=draw(st.sampled_from(["", "1024x1024", "1728x960", "2048x1024"])),
                view_type=draw(st.one_of(st.just(""), idents)),
            ),
        )
        target = request.image  # type: ignore[assignment]
        fields = ["character_id", "character_name", "prompt", "resolution", "view_type", "costume_id"]
    request.metadata.update(
        draw(
            st.dictionaries(
                st.from_regex(r"[A-Za-z][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
                st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"]), max_size=60),
                max_size=8,
            )
        )
    )
    if draw(st.booleans()):
        request.request_id = draw(
            st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"]), max_size=40)
        )
    # Hypothesis favours small draws, so the swap is the draw of 2, not of 0.
    if draw(st.integers(0, 2)) == 2:
        setattr(target, draw(st.sampled_from(fields)), draw(texts(100)))
    return request


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


@st.composite
def wire_requests(draw: st.DrawFn) -> bytes:
    """The bytes on the wire: a serialized request, sometimes with extra fields or broken."""
    raw = draw(st.one_of(near_valid_requests(), create_requests())).SerializeToString()
    mangle = draw(st.sampled_from(["none", "none", "unknown_field", "bad_utf8", "garbage", "truncated"]))
    if mangle == "unknown_field":
        return raw + _field(draw(st.integers(100, 536_870_911)), draw(st.binary(max_size=128)))
    if mangle == "bad_utf8":  # request_id (field 6) with bytes that are not UTF-8
        junk = draw(st.binary(min_size=1, max_size=16).filter(lambda b: not _is_utf8(b)))
        return raw + _field(6, junk)
    if mangle == "garbage":
        return draw(st.binary(max_size=256))
    if mangle == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    return raw


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


tokens = st.one_of(
    st.just(TOKEN_A),
    st.just(TOKEN_A),
    st.just(TOKEN_B),
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80),
    st.just(TOKEN_A + "x"),
    st.just(TOKEN_A[:-1]),
)


@dataclasses.dataclass
class Record:
    """What the run accepted, to check against the store afterwards."""

    accepted: dict[tuple[str, str], task_service_pb2.CreateTaskRequest] = dataclasses.field(
        default_factory=dict
    )
    #: (tenant, request_id) pairs used so far, by either run: they share one stack.
    request_ids: set[tuple[str, str]] = dataclasses.field(default_factory=lambda: USED_REQUEST_IDS)
    codes: dict[str, int] = dataclasses.field(default_factory=dict)


def expected(raw: bytes, token: str | None, seen: set[tuple[str, str]]) -> set[grpc.StatusCode]:
    """The answers the API allows for these bytes and this token."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return {grpc.StatusCode.RESOURCE_EXHAUSTED}
    if token not in TENANT_OF:
        return {grpc.StatusCode.UNAUTHENTICATED}
    try:
        request = task_service_pb2.CreateTaskRequest.FromString(raw)
        validation.validate_create(request)
    except (DecodeError, validation.RequestInvalidError):
        return {grpc.StatusCode.INVALID_ARGUMENT}
    if request.request_id and (TENANT_OF[token], request.request_id) in seen:
        # The same request_id returns the task it created (or names the type clash).
        return {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    return {grpc.StatusCode.OK}


def describe(raw: bytes, token: str | None) -> str:
    """A short account of a request for failure messages (the bytes may be megabytes)."""
    names = {TOKEN_A: "token A", TOKEN_B: "token B"}
    who = "no token" if token is None else names.get(token, f"token {token[:20]!r}")
    try:
        request = task_service_pb2.CreateTaskRequest.FromString(raw)
    except DecodeError:
        return f"{len(raw)} undecodable bytes {raw[:60]!r}, {who}"
    text = repr(request)
    return f"{len(raw)} bytes, {who}: {text[:1500]}{'...' if len(text) > 1500 else ''}"


def revalidate(task: task_pb2.Task) -> None:
    """A stored task rebuilt as the request that made it passes validation again.

    The gateway adds characterId/characterName/viewType/costumeId to metadata from the payload;
    those entries are checked on their own (they come from validated payload fields).
    """
    kind = task.WhichOneof("payload")
    payload = getattr(task, kind) if kind else None
    own = {
        k: v
        for k, v in task.metadata.items()
        if not (k in DERIVED and payload is not None and getattr(payload, DERIVED[k], None) == v)
    }
    request = task_service_pb2.CreateTaskRequest(
        type=task.type, priority=task.priority, metadata=own, request_id=task.request_id
    )
    if kind == "image":
        request.image.CopyFrom(task.image)
    elif kind == "tts":
        request.tts.CopyFrom(task.tts)
    validation.validate_create(request)
    derived = {k: v for k, v in task.metadata.items() if k not in own}
    checker = validation._Checker()
    validation.validate_metadata(checker, "metadata", derived)
    checker.raise_if_any()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Charai]:
    # The rate limit is tested on its own (test_limits); here it would only add noise.
    async with running_charai(
        Path(tmp_path_factory.mktemp("fuzz")), gateway={"submit_rate_per_tenant": 0}
    ) as running:
        yield running


def in_loop(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on the test's loop from Hypothesis' thread and waits for its result."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    return run


async def fuzz(charai: Charai, transport: str) -> Record:
    run = in_loop(asyncio.get_running_loop())
    record = Record()

    async def send(raw: bytes, token: str | None) -> Answer:
        if transport == "grpc":
            return await grpc_unary(charai.channel, "CreateTask", raw, bearer(token))
        return await grpcweb(charai.http, charai.base, "CreateTask", raw, token)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        # No shrinking: a failing example may be megabytes, and shrinking it takes minutes; the
        # assertion messages describe the request instead.
        phases=(Phase.explicit, Phase.generate),
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(raw=wire_requests(), token=tokens)
    def one(raw: bytes, token: str | None) -> None:
        answer: Answer = run(send(raw, token))
        note = describe(raw, token)
        record.codes[answer.code.name] = record.codes.get(answer.code.name, 0) + 1
        assert answer.code in ALLOWED, f"{answer.code.name}: {answer.message} for {note}"
        allowed = expected(raw, token, record.request_ids)
        assert answer.code in allowed, (
            f"got {answer.code.name} ({answer.message!r}), expected one of {[c.name for c in allowed]}"
            f" for {note}"
        )
        if answer.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert answer.message.startswith("invalid request: "), answer.message
        if answer.code != grpc.StatusCode.OK:
            return
        assert token is not None
        tenant = TENANT_OF[token]
        request = task_service_pb2.CreateTaskRequest.FromString(raw)
        task = task_service_pb2.CreateTaskResponse.FromString(answer.messages[0]).task
        stored: task_pb2.Task = run(charai.stored(tenant, task.id))
        revalidate(stored)
        key = (tenant, request.request_id)
        if not request.request_id or key not in record.request_ids:
            # What was stored is exactly what was sent, byte for byte.
            kind = request.WhichOneof("payload")
            assert kind is not None
            assert getattr(stored, kind) == getattr(request, kind)
            assert all(stored.metadata[k] == v for k, v in request.metadata.items())
            assert stored.type == request.type and stored.priority in {request.priority, 2}
            record.accepted[(tenant, task.id)] = request
        if request.request_id:
            record.request_ids.add(key)

    await asyncio.to_thread(one)
    return record


async def everything_stored(charai: Charai, tenant: str) -> list[task_pb2.Task]:
    tasks: list[task_pb2.Task] = []
    token = ""
    while True:
        response = await charai.store.list_tasks(
            tenant, task_service_pb2.ListTasksRequest(page_size=500, page_token=token)
        )
        tasks += response.tasks
        token = response.next_page_token
        if not token:
            return tasks


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_arbitrary_create_requests(charai: Charai, transport: str) -> None:
    record = await fuzz(charai, transport)
    print(f"{transport}: answers {record.codes}")
    # The run exercised every kind of answer it can (else the generator drifted).
    assert record.codes.get("INVALID_ARGUMENT", 0) > 0 and record.codes.get("UNAUTHENTICATED", 0) > 0
    assert record.codes.get("OK", 0) > 0, record.codes
    # The gateway is still up and serving: health, and a plain valid request.
    ok = await grpc_unary(charai.channel, "CreateTask", tts_request(), bearer(TOKEN_A))
    assert ok.code == grpc.StatusCode.OK, ok.message
    async with charai.http.get(f"{charai.base}/healthz") as resp:
        assert resp.status == 200
    # Nothing invalid is stored, whoever it belongs to.
    for tenant in (TENANT_A, TENANT_B):
        for task in await everything_stored(charai, tenant):
            revalidate(task)
    ids = {task.id for tenant in (TENANT_A, TENANT_B) for task in await everything_stored(charai, tenant)}
    assert {task_id for _, task_id in record.accepted} <= ids


def bad_everywhere() -> task_service_pb2.CreateTaskRequest:
    """The worst refusal to describe: every field bad, 32 metadata keys of 4-byte characters
    (each named in the answer), a prompt full of control characters. Fuzzing found one like it
    whose status (3 KiB message + 5 KiB details) outgrew the 8 KiB a gRPC client accepts in
    trailers, so the caller saw RESOURCE_EXHAUSTED instead of the violations."""
    return task_service_pb2.CreateTaskRequest(
        type=-21474836,  # type: ignore[arg-type]
        priority=99,  # type: ignore[arg-type]
        request_id="\u202e" * 200,
        image=task_pb2.ImagePayload(
            character_id="../" * 60, prompt="\x07\x1b" * 2000, resolution="9x9", view_type="\x00" * 100
        ),
        metadata={f"{n:02d}" + "🧙" * 60: "\x1b" * 500 for n in range(32)},
    )


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_a_request_bad_in_every_field_is_refused_within_the_trailer_limit(
    charai: Charai, transport: str
) -> None:
    raw = bad_everywhere().SerializeToString()
    if transport == "grpc":
        answer = await grpc_unary(charai.channel, "CreateTask", raw, bearer(TOKEN_A))
    else:
        answer = await grpcweb(charai.http, charai.base, "CreateTask", raw, TOKEN_A)
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, answer.message
    assert answer.message.startswith("invalid request: type: must be"), answer.message
    assert answer.message.endswith(" more)"), answer.message
    assert answer.details is not None
    bad = error_details_pb2.BadRequest()
    assert answer.details.details[0].Unpack(bad)
    fields = [v.field for v in bad.field_violations]
    assert fields[0] == "type" and len(fields) >= 5, fields
