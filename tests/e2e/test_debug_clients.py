"""The debugging clients people reach for, against the real stack: ``buf curl`` over native gRPC
(with server reflection) and over gRPC-web (with the protos as schema), and ``grpcurl``.

Nothing here is ours: each tool speaks the protocol its own way, so these prove that a stranger's
client works against the gateway's two ports.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from charai.devstack.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "clients/typescript/node_modules/.bin/buf"
GRPCURL = ROOT / ".venv/bin/grpcurl"
SERVICE = "charai.tasks.v1.TaskService"
GRPC = ["--protocol", "grpc", "--http2-prior-knowledge"]
GRPC_WEB = ["--protocol", "grpcweb", "--schema", str(ROOT / "protos")]


async def run(*argv: str, stdin: str | None = None, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")},
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(*argv: str, stdin: str | None = None) -> str:
    code, out, err = await run(*argv, stdin=stdin)
    assert code == 0, f"{Path(argv[0]).name} exited {code}:\n{err}\n{out}"
    return out


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects both tools print one after another for a stream."""
    decoder = json.JSONDecoder()
    objects: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return objects
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)


def check_watch(messages: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    """Every event of the task's stream, checked: snapshot first, progress never goes back,
    sequences increase, one COMPLETED at the end. Returns the events."""
    events = [m["event"] for m in messages if m["event"]["type"] != "TASK_EVENT_TYPE_HEARTBEAT"]
    types = [e["type"] for e in events]
    assert types[0] == "TASK_EVENT_TYPE_SNAPSHOT", types
    assert types[-1] == "TASK_EVENT_TYPE_COMPLETED", types
    assert types.count("TASK_EVENT_TYPE_COMPLETED") == 1, types
    assert events[-1]["task"]["status"] == "TASK_STATUS_COMPLETED"
    assert all(e["task"]["id"] == task_id for e in events)
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == sorted(set(sequences)), sequences
    progress = [e["task"].get("progress", 0) for e in events]
    assert progress == sorted(progress), progress
    assert progress[-1] == 100
    return events


def image_request(character_id: str, prompt: str) -> str:
    return json.dumps(
        {
            "type": "TASK_TYPE_IMAGE_GENERATION",
            "image": {
                "characterId": character_id,
                "characterName": "Li Ming",
                "prompt": prompt,
                "resolution": "1024x1024",
                "viewType": "front",
            },
        }
    )


async def test_buf_curl_native_grpc_with_reflection(stack: Stack) -> None:
    url = f"http://{stack.gateway_grpc}"
    services = (await ok(str(BUF), "curl", *GRPC, "--list-services", url)).split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)
    methods = (await ok(str(BUF), "curl", *GRPC, "--list-methods", url)).split()
    assert {f"{SERVICE}/{m}" for m in ("CreateTask", "WatchTask", "WatchTasks", "ListTasks")} <= set(methods)
    health = json.loads(await ok(str(BUF), "curl", *GRPC, "-d", "{}", f"{url}/grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}

    created = json.loads(
        await ok(
            str(BUF), "curl", *GRPC, "-d", "@-", f"{url}/{SERVICE}/CreateTask",
            stdin=image_request("char_bufcurl", "a swordsman [[latency:2.5]]"),
        )
    )  # fmt: skip
    task = created["task"]
    assert task["status"] == "TASK_STATUS_QUEUED"
    assert task["metadata"]["characterId"] == "char_bufcurl"
    out = await ok(
        str(BUF), "curl", *GRPC, "-d", json.dumps({"id": task["id"]}), f"{url}/{SERVICE}/WatchTask"
    )
    events = check_watch(json_stream(out), task["id"])
    assert any(e["type"] == "TASK_EVENT_TYPE_PROGRESS" for e in events)
    assert events[-1]["task"]["imageResult"]["imageUrl"].startswith(stack.gateway_http + "/media/")

    # A rejected request: exit code = gRPC code << 3, and the BadRequest detail is printed.
    code, _, err = await run(
        str(BUF), "curl", *GRPC, "-d", image_request("char_bufcurl", ""), f"{url}/{SERVICE}/CreateTask"
    )
    assert code == 3 << 3, err
    problem = json.loads(err)
    assert problem["code"] == "invalid_argument"
    assert problem["details"][0]["type"] == "google.rpc.BadRequest"
    assert "image.prompt" in problem["message"]


async def test_buf_curl_grpc_web_unary_and_streaming(stack: Stack) -> None:
    url = stack.gateway_http
    created = json.loads(
        await ok(
            str(BUF), "curl", *GRPC_WEB, "-d", image_request("char_bufweb", "many events [[latency:2.5]]"),
            f"{url}/{SERVICE}/CreateTask",
        )
    )  # fmt: skip
    task_id = created["task"]["id"]
    # The watch right after the create (the provider takes 2.5 s), the unary read after it: a
    # GetTask in between once let the task end before the watch began on a busy machine.
    out = await ok(
        str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"id": task_id}), f"{url}/{SERVICE}/WatchTask"
    )
    check_watch(json_stream(out), task_id)
    got = json.loads(
        await ok(str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"id": task_id}), f"{url}/{SERVICE}/GetTask")
    )
    assert (got["task"]["id"], got["task"]["status"]) == (task_id, "TASK_STATUS_COMPLETED")
    # The whole log again (a live watch that started late on a busy machine holds the early
    # events in its snapshot): every progress event, over gRPC-web too.
    replay = await ok(
        str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"id": task_id, "afterSequence": "1"}),
        f"{url}/{SERVICE}/WatchTask",
    )  # fmt: skip
    progress = [m["event"] for m in json_stream(replay) if m["event"]["type"] == "TASK_EVENT_TYPE_PROGRESS"]
    assert len(progress) >= 3, f"only {len(progress)} progress events over gRPC-web"

    listed = json.loads(
        await ok(
            str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"metadata": {"characterId": "char_bufweb"}}),
            f"{url}/{SERVICE}/ListTasks",
        )
    )  # fmt: skip
    assert [t["id"] for t in listed["tasks"]] == [task_id]

    # An error through gRPC-web: code, message and the BadRequest detail survive the bridge.
    code, _, err = await run(
        str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"id": "not-a-task"}), f"{url}/{SERVICE}/WatchTask"
    )
    assert code == 3 << 3, err
    problem = json.loads(err)
    assert problem["code"] == "invalid_argument"
    assert problem["details"][0]["type"] == "google.rpc.BadRequest"
    code, _, err = await run(
        str(BUF), "curl", *GRPC_WEB, "-d", json.dumps({"id": "task_" + "0" * 32}), f"{url}/{SERVICE}/GetTask"
    )
    assert code == 5 << 3, err
    assert json.loads(err)["code"] == "not_found"


async def test_grpcurl_list_describe_and_create_from_json(stack: Stack) -> None:
    target = stack.gateway_grpc
    services = (await ok(str(GRPCURL), "-plaintext", target, "list")).split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    methods = (await ok(str(GRPCURL), "-plaintext", target, "list", SERVICE)).split()
    assert f"{SERVICE}.WatchTask" in methods
    described = await ok(str(GRPCURL), "-plaintext", target, "describe", SERVICE)
    watch = (
        "rpc WatchTask ( .charai.tasks.v1.WatchTaskRequest )"
        " returns ( stream .charai.tasks.v1.WatchTaskResponse );"
    )
    assert watch in described
    payload = await ok(str(GRPCURL), "-plaintext", target, "describe", "charai.tasks.v1.TtsPayload")
    assert "string voice_style = 4;" in payload
    assert "optional double speed = 5;" in payload

    # CreateTask from JSON on stdin (-d @), then follow it to the end.
    request = {
        "type": "TASK_TYPE_TTS_GENERATION",
        "priority": "PRIORITY_HIGH",
        "metadata": {"category": "voice_lines"},
        "tts": {
            "characterId": "char_grpcurl",
            "text": "Hello from grpcurl [[latency:2.5]]",
            "voiceStyle": "tongtong",
        },
    }
    created = json.loads(
        await ok(
            str(GRPCURL), "-plaintext", "-d", "@", target, f"{SERVICE}/CreateTask", stdin=json.dumps(request)
        )
    )
    task = created["task"]
    assert task["type"] == "TASK_TYPE_TTS_GENERATION"
    assert task["priority"] == "PRIORITY_HIGH"
    assert task["metadata"] == {"category": "voice_lines", "characterId": "char_grpcurl"}
    out = await ok(
        str(GRPCURL), "-plaintext", "-d", json.dumps({"id": task["id"]}), target, f"{SERVICE}/WatchTask"
    )
    events = check_watch(json_stream(out), task["id"])
    # grpcurl prints the proto field names (buf curl prints the JSON names).
    assert events[-1]["task"]["tts_result"]["duration_seconds"] > 0

    # A bad request: grpcurl shows the code and the field.
    code, out, err = await run(
        str(GRPCURL), "-plaintext", "-d", json.dumps({"type": "TASK_TYPE_TTS_GENERATION", "tts": {}}),
        target, f"{SERVICE}/CreateTask",
    )  # fmt: skip
    assert code != 0
    assert "InvalidArgument" in out + err
    assert "tts.character_id" in out + err
