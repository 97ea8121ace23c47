"""The seed's REST routes against the real processes: ``characterTasksApi``'s exact requests, the
metadata query, cancel, Server-Sent Events with resume, and error JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
import os
import sys
import uuid
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from charai.devstack.stack import Stack

from tests.conftest import eventually
from tests.e2e.conftest import FAST_SETTINGS

FRONTEND = "http://frontend.example:5173"
UNKNOWN_ID = "task_" + "0" * 32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The devstack with a frontend origin allowed (the seed's app lives on another origin)."""
    env = {**FAST_SETTINGS, "CHARAI_CORS_ORIGINS": FRONTEND}
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    async with Stack(
        Path(tmp_path_factory.mktemp("rest")),
        env,
        free_ports=True,
        echo=echo,
        emulator_args=["--latency", "0.05:0.15", "--async-poll-steps", "2"],
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(stack: Stack) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(stack.gateway_http, timeout=aiohttp.ClientTimeout(total=60)) as http:
        yield Api(http)


# -- the seed's characterTasksApi, transcribed from TypeScript --------------------------------


def submit_image_task_body(params: dict[str, str]) -> dict[str, Any]:
    """``characterTasksApi.submitImageTask``'s body, field for field."""
    return {
        "type": "image_generation",
        "priority": "normal",
        "payload": {
            "characterId": params["characterId"],
            "viewType": params["viewType"],
            "prompt": params["prompt"],
            "resolution": params["resolution"],
            "callback": {
                "type": "character_view",
                "characterId": params["characterId"],
                "viewType": params["viewType"],
            },
        },
    }


def submit_tts_task_body(params: dict[str, Any]) -> dict[str, Any]:
    """``characterTasksApi.submitTTSTask``'s body (``...params.options`` spread into the payload)."""
    return {
        "type": "tts_generation",
        "priority": "normal",
        "payload": {
            "characterId": params["characterId"],
            "text": params["text"],
            "voiceStyle": params["voiceStyle"],
            **params.get("options", {}),
            "callback": {
                "type": "character_voice",
                "characterId": params["characterId"],
            },
        },
    }


class Api:
    """The seed's ``api.get`` / ``api.post``: JSON in, JSON out, relative URLs."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        async with self.http.post(path, json=body, **kw) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.get(path, **kw) as resp:
            return resp.status, await resp.json()

    async def until_done(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        async def done() -> bool:
            status, task = await self.get(f"/api/tasks/{task_id}")
            assert status == 200, task
            return task["status"] in {"completed", "failed", "cancelled"}

        await eventually(done, timeout=timeout, interval=0.1)
        status, task = await self.get(f"/api/tasks/{task_id}")
        assert status == 200, task
        return task  # type: ignore[no-any-return]

    async def until_status(self, task_id: str, status: str, timeout: float = 30.0) -> None:
        async def reached() -> bool:
            return bool((await self.get(f"/api/tasks/{task_id}"))[1]["status"] == status)

        await eventually(reached, timeout=timeout)

    async def download(self, url: str) -> tuple[str, bytes]:
        async with self.http.get(url) as resp:
            assert resp.status == 200
            return resp.headers["Content-Type"], await resp.read()


def character() -> str:
    return f"char_{uuid.uuid4().hex[:10]}"


TASK_KEYS = {
    "id",
    "type",
    "priority",
    "status",
    "progress",
    "stage",
    "metadata",
    "payload",
    "result",
    "error",
    "attempt",
    "maxAttempts",
    "createdAt",
    "startedAt",
    "completedAt",
    "queuePosition",
}


# -- submit, poll, download -------------------------------------------------------------------


async def test_seed_requests_submit_poll_and_download(api: Api) -> None:
    char = character()
    image_body = submit_image_task_body(
        {"characterId": char, "viewType": "front", "prompt": "a young swordsman", "resolution": "1024x1024"}
    )
    tts_body = submit_tts_task_body(
        {
            "characterId": char,
            "text": "你好，我是李明。",
            "voiceStyle": "tongtong",
            "options": {"speed": 1.0, "volume": 1.0, "responseFormat": "wav"},
        }
    )
    (image_status, image), (tts_status, tts) = await asyncio.gather(
        api.post("/api/tasks", image_body), api.post("/api/tasks", tts_body)
    )
    assert (image_status, tts_status) == (201, 201), (image, tts)
    for task, body in ((image, image_body), (tts, tts_body)):
        assert task.keys() >= TASK_KEYS
        assert (task["type"], task["priority"], task["status"]) == (body["type"], "normal", "queued")
        assert task["payload"] == body["payload"]  # the seed's own shape comes back
        assert task["metadata"]["characterId"] == char
        assert task["result"] is None and task["error"] is None and task["progress"] == 0
        assert task["createdAt"].endswith("Z") and task["completedAt"] is None
    assert image["metadata"]["viewType"] == "front"

    image, tts = await asyncio.gather(api.until_done(image["id"]), api.until_done(tts["id"]))
    assert (image["status"], image["progress"], image["stage"]) == ("completed", 100, "completed")
    assert image["completedAt"] and image["startedAt"] and image["error"] is None
    assert {"imageUrl", "prompt", "resolution", "generatedAt"} <= image["result"].keys()
    assert (image["result"]["prompt"], image["result"]["resolution"]) == ("a young swordsman", "1024x1024")
    content_type, png = await api.download(image["result"]["imageUrl"])
    assert content_type == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert image["result"]["sizeBytes"] == len(png)

    assert tts["status"] == "completed"
    assert {"audioUrl", "text", "voiceStyle", "generatedAt", "duration"} <= tts["result"].keys()
    content_type, audio = await api.download(tts["result"]["audioUrl"])
    assert content_type.startswith("audio/") and audio[:4] == b"RIFF"
    with wave.open(io.BytesIO(audio)) as wav:
        assert abs(wav.getnframes() / wav.getframerate() - tts["result"]["duration"]) < 0.01


async def test_idempotency_key_and_request_id_return_the_same_task(api: Api) -> None:
    body = submit_image_task_body(
        {"characterId": character(), "viewType": "side", "prompt": "a mage", "resolution": "1024x1024"}
    )
    key = uuid.uuid4().hex
    (s1, first), (s2, again) = await asyncio.gather(
        api.post("/api/tasks", body, headers={"Idempotency-Key": key}),
        api.post("/api/tasks", {**body, "requestId": key}),
    )
    assert (s1, s2) == (201, 201)
    assert first["id"] == again["id"] and first["requestId"] == key


# -- the metadata query -----------------------------------------------------------------------


async def test_get_character_tasks_by_metadata(api: Api) -> None:
    char = character()
    plain = submit_image_task_body(
        {"characterId": char, "viewType": "back", "prompt": "a knight", "resolution": "1024x1024"}
    )
    categorised = {
        **plain,
        # The seed's "Task-Character Association" example.
        "metadata": {
            "characterId": char,
            "characterName": "李明",
            "viewType": "front",
            "category": "character_design",
        },
    }
    other = submit_image_task_body(
        {"characterId": character(), "viewType": "back", "prompt": "a bard", "resolution": "1024x1024"}
    )
    sketch = {**plain, "metadata": {"category": "sketches"}}  # the client's own category wins
    bodies = (plain, categorised, other, sketch)
    created = await asyncio.gather(*(api.post("/api/tasks", b) for b in bodies))
    assert [s for s, _ in created] == [201, 201, 201, 201]
    plain_id, categorised_id, _, sketch_id = (t["id"] for _, t in created)

    # getCharacterTasks: GET /api/tasks?metadata.characterId=… answers Task[]
    status, tasks = await api.get(f"/api/tasks?metadata.characterId={char}")
    assert status == 200 and isinstance(tasks, list)
    assert {t["id"] for t in tasks} == {plain_id, categorised_id, sketch_id}
    # The seed's own query finds what the seed's own functions submitted (a character callback
    # and no metadata: category character_design is filled in), not the client's other category.
    status, tasks = await api.get(
        f"/api/tasks?metadata.characterId={char}&metadata.category=character_design"
    )
    assert (status, {t["id"] for t in tasks}) == (200, {plain_id, categorised_id})
    assert {t["metadata"]["characterName"] for t in tasks if t["id"] == categorised_id} == {"李明"}
    status, tasks = await api.get(f"/api/tasks?metadata.characterId={char}&type=tts_generation")
    assert (status, tasks) == (200, [])

    design = f"metadata.characterId={char}&metadata.category=character_design"
    async with api.http.get(f"/api/tasks?{design}&pageSize=1") as resp:
        first_page = await resp.json()
        token = resp.headers["X-Next-Page-Token"]
        link = resp.headers["Link"]
    assert len(first_page) == 1 and link.endswith('>; rel="next"') and token
    next_url = link[1 : link.index(">")]
    status, second_page = await api.get(next_url)
    assert status == 200 and len(second_page) == 1
    assert {first_page[0]["id"], second_page[0]["id"]} == {plain_id, categorised_id}


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_running_task(api: Api) -> None:
    body = submit_image_task_body(
        {
            "characterId": character(),
            "viewType": "front",
            "prompt": f"a slow portrait {uuid.uuid4().hex[:6]} [[hang:20]]",
            "resolution": "1024x1024",
        }
    )
    status, task = await api.post("/api/tasks", body)
    assert status == 201
    await api.until_status(task["id"], "running", timeout=15)
    status, cancelled = await api.post(f"/api/tasks/{task['id']}/cancel")
    assert (status, cancelled["status"], cancelled["stage"]) == (200, "cancelled", "cancelled")
    assert (await api.until_done(task["id"]))["status"] == "cancelled"
    async with api.http.get(f"/api/tasks/{task['id']}/events") as resp:
        events = await read_sse(resp)
    assert [e.event for e in events] == ["task:cancelled"]
    assert events[0].data["status"] == "cancelled"


# -- Server-Sent Events -----------------------------------------------------------------------


@dataclasses.dataclass
class Sse:
    id: int | None
    event: str
    data: dict[str, Any]


async def read_sse(resp: aiohttp.ClientResponse, timeout: float = 30.0) -> list[Sse]:
    """Every event of an SSE response until the server ends it (heartbeat comments skipped)."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events: list[Sse] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    events.append(
                        Sse(
                            int(fields["id"]) if "id" in fields else None,
                            fields.get("event", "message"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return events


def progress_view(events: list[Sse]) -> list[tuple[int | None, str, int, str, str]]:
    return [(e.id, e.event, e.data["progress"], e.data["status"], e.data["stage"]) for e in events]


async def test_sse_events_in_order_then_resume_with_last_event_id(api: Api) -> None:
    body = submit_image_task_body(
        {
            "characterId": character(),
            "viewType": "front",
            "prompt": "a painter [[latency:0.6]]",
            "resolution": "1024x1024",
        }
    )
    status, task = await api.post("/api/tasks", body)
    assert status == 201
    async with api.http.get(f"/api/tasks/{task['id']}/events") as resp:
        events = await read_sse(resp)
    ids = [e.id for e in events]
    assert all(i is not None for i in ids) and all(b > a for a, b in itertools.pairwise(ids)), ids  # type: ignore[operator]
    assert events[0].data["eventType"] == "snapshot"
    assert events[-1].event == "task:completed"
    assert {e.event for e in events[:-1]} == {"task:progress"}
    progress = [e.data["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 100, progress
    assert len(events) >= 4, progress_view(events)  # snapshot, started, provider progress, 90, done
    final = events[-1].data
    assert final["taskId"] == task["id"] and final["status"] == "completed"
    assert final["result"]["imageUrl"].startswith("http") and "error" not in final
    assert final["metadata"]["characterId"] == body["payload"]["characterId"]

    # A reconnect with Last-Event-ID gets exactly the later events; so does ?after=.
    middle = events[1].id
    async with api.http.get(f"/api/tasks/{task['id']}/events", headers={"Last-Event-ID": str(middle)}) as r:
        resumed = await read_sse(r)
    assert progress_view(resumed) == progress_view(events[2:])
    async with api.http.get(f"/api/tasks/{task['id']}/events?after={events[0].id}") as r:
        resumed = await read_sse(r)
    assert progress_view(resumed) == progress_view(events[1:])
    # After the last event of a finished task there is nothing more: 204 stops EventSource.
    async with api.http.get(
        f"/api/tasks/{task['id']}/events", headers={"Last-Event-ID": str(events[-1].id)}
    ) as r:
        assert r.status == 204


# -- errors -----------------------------------------------------------------------------------


def violations(body: dict[str, Any]) -> list[str]:
    return [v["field"] for v in body["error"]["fieldViolations"]]


async def test_errors_are_json_with_matching_http_status(api: Api) -> None:
    good = submit_image_task_body(
        {"characterId": character(), "viewType": "front", "prompt": "x", "resolution": "1024x1024"}
    )
    no_prompt = {**good, "payload": {**good["payload"], "prompt": ""}}
    unknown_field = {**good, "payload": {**good["payload"], "negativePrompt": "blurry"}}
    bad_type = {**good, "type": "video_generation"}
    bad_size = {**good, "payload": {**good["payload"], "resolution": "10x10"}}
    bad_callback = {**good, "payload": {**good["payload"], "callback": {"type": "character_voice"}}}
    cases = [
        (no_prompt, ["payload.prompt"]),
        (unknown_field, ["payload.negativePrompt"]),
        (bad_type, ["type"]),
        (bad_size, ["payload.resolution"]),
        (bad_callback, ["payload.callback.type"]),
        ({**good, "extra": 1}, ["extra"]),
    ]
    answers = await asyncio.gather(*(api.post("/api/tasks", body) for body, _ in cases))
    for (body, fields), (status, answer) in zip(cases, answers, strict=True):
        assert status == 400, answer
        assert answer["error"]["code"] == "INVALID_ARGUMENT"
        assert violations(answer) == fields, (body, answer)
        assert fields[0] in answer["error"]["message"]

    for method, path in (
        ("GET", f"/api/tasks/{UNKNOWN_ID}"),
        ("POST", f"/api/tasks/{UNKNOWN_ID}/cancel"),
        ("GET", f"/api/tasks/{UNKNOWN_ID}/events"),
    ):
        async with api.http.request(method, path) as resp:
            assert resp.status == 404, path
            assert (await resp.json())["error"]["code"] == "NOT_FOUND"

    status, answer = await api.get("/api/tasks/not-a-task-id")
    assert (status, violations(answer)) == (400, ["id"])
    status, answer = await api.get("/api/tasks?metadata.characterId=x&colour=red")
    assert (status, violations(answer)) == (400, ["colour"])
    async with api.http.post(
        "/api/tasks", data="{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "INVALID_ARGUMENT"
    async with api.http.post("/api/tasks", data="type=image_generation") as r:
        assert r.status == 415
    huge = {**good, "payload": {**good["payload"], "prompt": "x" * (12 * 1024 * 1024 + 1)}}
    raw = io.BytesIO(json.dumps(huge).encode())
    async with api.http.post("/api/tasks", data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "RESOURCE_EXHAUSTED"
    status, listed = await api.get(f"/api/tasks?metadata.characterId={good['payload']['characterId']}")
    assert (status, listed) == (200, [])  # nothing rejected was stored


async def test_a_frontend_on_another_origin_may_call(api: Api) -> None:
    preflight = {
        "Origin": FRONTEND,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    async with api.http.options("/api/tasks", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    async with api.http.get("/api/tasks?metadata.characterId=nobody", headers={"Origin": FRONTEND}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    async with api.http.post("/api/tasks", json={}, headers={"Origin": "http://elsewhere.example"}) as resp:
        assert resp.status == 403
    # DELETE is a documented route: a listed origin's preflight for it is granted; a script
    # there may read Retry-After (a 429) and WWW-Authenticate (a 401).
    preflight["Access-Control-Request-Method"] = "DELETE"
    async with api.http.options(f"/api/tasks/{UNKNOWN_ID}", headers=preflight) as resp:
        assert resp.status == 204 and "DELETE" in resp.headers["Access-Control-Allow-Methods"]
    async with api.http.get("/api/tasks?metadata.characterId=nobody", headers={"Origin": FRONTEND}) as resp:
        exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"retry-after", "www-authenticate"} <= exposed


async def test_without_client_tokens_only_loopback_host_names_are_answered(api: Api, stack: Stack) -> None:
    # DNS rebinding: a site whose name now points at 127.0.0.1 is same-origin to its own page,
    # so the origin check let it submit on a gateway without client tokens; its Host names it.
    port = stack.gateway_http.rpartition(":")[2]
    for host in (f"rebound.example:{port}", "rebound.example", f"127.0.0.1.nip.example:{port}"):
        headers = {"Host": host, "Origin": f"http://{host}"}
        async with api.http.post("/api/tasks", json={}, headers=headers) as resp:
            assert resp.status == 403, host
            assert resp.headers["Content-Type"].startswith("application/json")
        async with api.http.get(f"/api/tasks/{UNKNOWN_ID}", headers={"Host": host}) as resp:
            assert resp.status == 403, host
    for host in (f"localhost:{port}", f"app.localhost:{port}", f"127.0.0.1:{port}", f"127.0.0.2:{port}"):
        async with api.http.get(f"/api/tasks/{UNKNOWN_ID}", headers={"Host": host}) as resp:
            assert resp.status == 404, host  # answered


async def test_inputs_that_crashed_a_route_are_400_naming_the_field(api: Api) -> None:
    body = json.dumps(
        submit_tts_task_body({"characterId": character(), "text": "hi", "voiceStyle": "tongtong"})
    )
    json_type = {"Content-Type": "application/json"}

    async def posted(path: str, raw: str) -> tuple[int, Any]:
        async with api.http.post(path, data=raw, headers=json_type) as resp:
            return resp.status, await resp.json()

    # A lone UTF-16 surrogate, which JSON may escape and no proto string holds (was a 500).
    lone_text = body.replace('"text": "hi"', '"text": "hi \\ud800"')
    lone_key = body.replace('"priority": "normal"', '"priority": "normal", "metadata": {"k\\udc00": "v"}')
    cases = [
        ("/api/tasks", lone_text, ["payload.text"]),
        ("/api/tasks", lone_key, ["metadata.k\ufffd"]),
        (
            "/api/tasks:batchCreate",
            f'{{"requests": [{body}, {lone_text}]}}',
            ["requests[1].payload.text"],
        ),
        ("/api/access-tokens", '{"metadata": {"characterId": "a\\udbff"}}', ["metadata.characterId"]),
        # Nested past the parser's recursion limit (was a 500, a RecursionError).
        ("/api/tasks", "[" * 100_000 + "]" * 100_000, [""]),
        ("/api/access-tokens", '{"a":' * 50_000 + "1" + "}" * 50_000, [""]),
        # A ttl past what a Duration holds (was a 500, an OverflowError).
        ("/api/access-tokens", '{"metadata": {"characterId": "c"}, "ttl": 1e300}', ["ttl"]),
        ("/api/access-tokens", '{"metadata": {"characterId": "c"}, "ttl": "1e300s"}', ["ttl"]),
    ]
    for path, raw, fields in cases:
        status, answer = await posted(path, raw)
        assert (status, violations(answer)) == (400, fields), (path, raw[:80], answer)
    # A surrogate pair is a character like any other.
    status, task = await posted("/api/tasks", body.replace('"text": "hi"', '"text": "hi \\ud83d\\ude00"'))
    assert status == 201 and task["payload"]["text"] == "hi \U0001f600", task
    # Digits that str.isdigit() takes and int() does not (was a 500).
    for path, field in (
        ("/api/tasks?pageSize=%C2%B2", "pageSize"),
        ("/api/usage?pageSize=%C2%B2", "pageSize"),
        ("/api/tasks/events?after=%C2%B2", "after"),
        (f"/api/tasks/{task['id']}/events?after=%C2%B2", "after"),
    ):
        status, answer = await api.get(path)
        assert (status, violations(answer)) == (400, [field]), (path, answer)


async def test_an_unknown_api_route_or_method_answers_json(api: Api) -> None:
    async with api.http.get("/api/nothing-here") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"
    async with api.http.put("/api/tasks", json={}) as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "UNIMPLEMENTED"
        assert "POST" in resp.headers["Allow"]
    async with api.http.get("/not-api") as resp:  # the console's own 404, as before
        assert resp.status == 404


async def test_a_resume_cursor_past_the_event_log_is_refused(api: Api) -> None:
    # A cursor from another deployment (or a wiped database): the task's stream skipped every
    # event up to it and never ended; the many-task stream stayed silent.
    status, task = await api.post(
        "/api/tasks",
        submit_tts_task_body({"characterId": character(), "text": "hi", "voiceStyle": "tongtong"}),
    )
    assert status == 201, task
    far = str(10**15)
    for path, headers in (
        (f"/api/tasks/{task['id']}/events", {"Last-Event-ID": far}),
        (f"/api/tasks/{task['id']}/events?after={far}", {}),
        (f"/api/tasks/events?after={far}", {}),
    ):
        async with api.http.get(path, headers=headers) as resp:
            assert resp.status == 400, (path, resp.status)
            body = await resp.json()
            assert [v["field"] for v in body["error"]["fieldViolations"]] == ["after"], body
    await api.until_done(task["id"])
    async with api.http.get(f"/api/tasks/{task['id']}/events", headers={"Last-Event-ID": "1"}) as resp:
        assert resp.status == 200  # a cursor of this log resumes as before
