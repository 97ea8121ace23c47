"""The seed's frontend in production: a page on its own origin, holding only an access token its
backend minted, talks to a gateway that has API keys and listens on 0.0.0.0 — in headless
Chromium (Debian's ``chromium`` driven by ``playwright-core``, like test_browser.py).

This test is the app's backend: with the tenant key (over gRPC) it creates a task of another
character (char_002) and mints a token for ``characterId=char_001`` with ``allowCreate``, then runs
``clients/console/e2e/seed-frontend.mjs``, which bundles ``e2e/seed-frontend/`` and serves it from
``http://127.0.0.1:<page port>`` (listed in ``CHARAI_CORS_ORIGINS``). The page:

(a) creates an image task for char_001 over gRPC-web (``@charai/client``) and watches it both over
    gRPC-web and over the multi-task SSE route (``@charai/client/seed``'s one EventSource): both
    see it complete, the SSE feed with every event the gRPC-web watch saw;
(b) is refused char_002's task (NOT_FOUND on gRPC-web, REST and the store), creating or listing
    outside char_001, GetQueueStats and CreateAccessToken (PERMISSION_DENIED, ACCESS_TOKEN_SCOPE),
    and, with a 2-second token once it has expired, everything (UNAUTHENTICATED,
    ACCESS_TOKEN_EXPIRED: gRPC-web, REST, and the SSE stream the store diagnoses);
(c) runs the seed's ``handleGenerateImage`` (transcribed verbatim; only the import is
    ``@charai/client/seed``) and its TTS counterpart: ``updateCharacterView`` gets
    ``result.imageUrl``; a provider refusal (``[[content]]``) toasts ``图片生成失败: <the message>``.

Then, while a slow task runs and the page keeps its EventSource open, the whole stack is stopped
and started again on the same data dir and ports: the page's stream resumes by itself and its
feed of that task equals the task's event log (every event once), the task completes, and the
``imageUrl`` the character record saved before the restart still decodes (``naturalWidth > 0``).
Screenshots: ``test-artifacts/seed-frontend.png`` and ``seed-frontend-after-restart.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from charai.devstack.stack import Stack
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from google.protobuf import duration_pb2

from tests.conftest import later_port
from tests.e2e.conftest import FAST_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "clients/console"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
TENANT_KEY = f"seed-backend-{secrets.token_hex(16)}"
TERMINAL = {"completed", "failed", "cancelled"}
SCREENSHOTS = ("seed-frontend.png", "seed-frontend-after-restart.png")


@contextlib.asynccontextmanager
async def running(stack: Stack) -> AsyncIterator[Stack]:
    try:
        await stack.start()
        yield stack
    finally:
        await stack.close()


class Backend:
    """The seed app's backend: the tenant key, over gRPC."""

    def __init__(self, grpc_addr: str, http_url: str) -> None:
        self.grpc_addr = grpc_addr
        self.http_url = http_url
        self.auth = (("authorization", f"Bearer {TENANT_KEY}"),)

    async def call(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(self.grpc_addr) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            return await getattr(stub, method)(request, metadata=self.auth, timeout=10)

    async def mint(self, ttl_seconds: int | None = None) -> task_service_pb2.CreateAccessTokenResponse:
        request = task_service_pb2.CreateAccessTokenRequest(
            metadata={"characterId": "char_001"}, allow_create=True
        )
        if ttl_seconds is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_seconds))
        response: task_service_pb2.CreateAccessTokenResponse = await self.call("CreateAccessToken", request)
        return response

    async def tasks(self, character_id: str) -> list[task_pb2.Task]:
        request = task_service_pb2.ListTasksRequest(metadata={"characterId": character_id}, page_size=100)
        response: task_service_pb2.ListTasksResponse = await self.call("ListTasks", request)
        return list(response.tasks)

    def get(self, path: str) -> tuple[int, str, bytes]:
        """A GET with the tenant key (blocking: run in a thread)."""
        request = urllib.request.Request(
            self.http_url + path, headers={"Authorization": f"Bearer {TENANT_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()

    async def event_log(self, task_id: str) -> list[dict[str, Any]]:
        """Every event of an ended task, from the single-task SSE route (after=1: the whole log)."""
        status, _, body = await asyncio.to_thread(self.get, f"/api/tasks/{task_id}/events?after=1")
        assert status == 200
        return [
            json.loads(line[len("data: ") :])
            for block in body.decode().split("\n\n")
            for line in block.splitlines()
            if line.startswith("data: ")
        ]


def assert_forward(states: list[dict[str, Any]], what: str) -> None:
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress), f"{what}: progress went back: {progress}"
    ends = [s for s in states if s["status"] in TERMINAL]
    assert ends == [states[-1]], f"{what}: {states}"


def prepare() -> None:
    """Checks what ``make test`` installs and builds; clears old screenshots."""
    assert CHROMIUM.exists(), "no /usr/bin/chromium: 'make test' installs Debian's chromium"
    assert (CONSOLE / "node_modules/playwright-core").exists(), "run 'make node'"
    assert (ROOT / "clients/typescript/dist/seed/index.js").exists(), "run 'make ts'"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # artifacts are never committed
    for name in SCREENSHOTS:
        (ARTIFACTS / name).unlink(missing_ok=True)


async def test_seed_frontend_with_an_access_token_in_headless_chromium(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    prepare()

    # Chosen long before their servers start (the page's after the whole stack's).
    http_port, grpc_port, page_port = later_port(), later_port(), later_port()
    gateway = f"http://127.0.0.1:{http_port}"
    env = {
        **FAST_SETTINGS,
        "CHARAI_API_KEYS": f"{TENANT_KEY}=seed-app",
        # Not loopback: allowed because there are API keys. The browser comes via 127.0.0.1.
        "CHARAI_GATEWAY_HTTP_ADDR": f"0.0.0.0:{http_port}",
        "CHARAI_GATEWAY_GRPC_ADDR": f"0.0.0.0:{grpc_port}",
        "CHARAI_PUBLIC_BASE_URL": gateway,
        "CHARAI_CORS_ORIGINS": f"http://127.0.0.1:{page_port}",
    }
    data = Path(tmp_path_factory.mktemp("seed-stack"))
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None

    def new_stack() -> Stack:
        emulator = ["--latency", "0.05:0.15", "--async-poll-steps", "2"]
        return Stack(data, env, free_ports=True, echo=echo, emulator_args=emulator)

    backend = Backend(f"127.0.0.1:{grpc_port}", gateway)
    restart_seconds = 0.0
    async with contextlib.AsyncExitStack() as stacks:
        await stacks.enter_async_context(running(new_stack()))
        foreign = await backend.call(
            "CreateTask",
            task_service_pb2.CreateTaskRequest(
                type=task_pb2.TASK_TYPE_TTS_GENERATION,
                tts=task_pb2.TtsPayload(
                    character_id="char_002", text="not for char_001", voice_style="tongtong"
                ),
            ),
        )
        token = await backend.mint()

        proc = await asyncio.create_subprocess_exec(
            "node", "e2e/seed-frontend.mjs",
            cwd=CONSOLE,
            env={
                **os.environ,
                "CHARAI_GATEWAY": gateway,
                "PAGE_PORT": str(page_port),
                "TOKEN": token.token,
                "FOREIGN_TASK": foreign.task.id,
                "SCREENSHOT_DIR": str(ARTIFACTS),
                "CHROMIUM": str(CHROMIUM),
            },
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr = asyncio.create_task(proc.stderr.read())
        seen: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(150):
                while line := await proc.stdout.readline():
                    message = json.loads(line)
                    if "result" in message:
                        seen = message["result"]
                        break
                    if message["need"] == "short-token":
                        short = await backend.mint(ttl_seconds=2)
                        answer: dict[str, str | float] = {
                            "token": short.token,
                            "expireTime": short.expire_time.ToJsonString(),
                        }
                    elif message["need"] == "restart":
                        started = time.monotonic()
                        await stacks.aclose()  # the whole stack, gateway first
                        stopped = time.monotonic()
                        await stacks.enter_async_context(running(new_stack()))
                        restart_seconds = time.monotonic() - started
                        answer = {"stop": stopped - started, "start": time.monotonic() - stopped}
                    else:
                        raise AssertionError(f"unknown request from the page driver: {message}")
                    proc.stdin.write(json.dumps(answer).encode() + b"\n")
                    await proc.stdin.drain()
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        errors = (await stderr).decode()
        assert seen is not None, f"the page driver printed no result; stderr:\n{errors[-4000:]}"
        report = json.dumps(seen, ensure_ascii=False, indent=1)
        await asyncio.to_thread((ARTIFACTS / "seed-frontend.json").write_text, report)  # what the page saw
        assert proc.returncode == 0, (
            f"{seen.get('error')}\n{json.dumps(seen.get('atFailure'))[:3000]}\n{json.dumps(seen)[:3000]}"
            f"\n{errors[-3000:]}"
        )
        assert seen["pageErrors"] == []

        # (a) Created over gRPC-web with the token, watched over gRPC-web and over SSE.
        created = seen["created"]
        assert created["final"] == "completed"
        assert created["metadata"]["characterId"] == "char_001"
        assert created["imageUrl"].startswith(f"{gateway}/media/")
        sse, grpc_events = created["sse"], created["grpc"]
        assert sse[0]["eventType"] == "queued" and sse[-1]["eventType"] == "completed", sse
        assert [e["sequence"] for e in sse] == sorted({e["sequence"] for e in sse}), "SSE repeated an event"
        assert_forward(sse, "SSE")
        assert grpc_events[0]["eventType"] == "snapshot" and grpc_events[-1]["status"] == "completed"
        assert_forward(grpc_events, "gRPC-web")
        missing = {e["sequence"] for e in grpc_events[1:]} - {e["sequence"] for e in sse}
        assert not missing, f"events the gRPC-web watch saw and the SSE feed did not: {missing}"

        # (b) Outside the token's scope, and after it expired.
        refused = seen["refusals"]
        not_found = {k: refused[k] for k in ("grpcGetForeign", "grpcWatchForeign", "grpcCancelForeign")}
        assert not_found == dict.fromkeys(not_found, "not_found TASK_NOT_FOUND"), refused
        assert refused["restGetForeign"] == "404 NOT_FOUND TASK_NOT_FOUND", refused
        assert refused["storeForeign"] == "404 NOT_FOUND", refused
        for call in ("grpcCreateForeign", "grpcListForeign", "queueStats", "createAccessToken"):
            assert refused[call] == "permission_denied ACCESS_TOKEN_SCOPE", (call, refused)
        for call in ("restCreateForeign", "restCreateAccessToken"):
            assert refused[call] == "403 PERMISSION_DENIED ACCESS_TOKEN_SCOPE", (call, refused)
        expiry = seen["expiry"]
        assert expiry["before"] == {"grpc": "ok", "rest": "ok"}, expiry
        assert expiry["grpc"] == "unauthenticated ACCESS_TOKEN_EXPIRED", expiry
        assert expiry["rest"] == "401 UNAUTHENTICATED ACCESS_TOKEN_EXPIRED", expiry
        assert expiry["sse"] == "401 UNAUTHENTICATED ACCESS_TOKEN_EXPIRED", expiry

        # (c) The seed's handlers, unchanged.
        calls = seen["calls"]
        tasks = await backend.tasks("char_001")
        failures = {t.type: t.error.message for t in tasks if t.status == task_pb2.TASK_STATUS_FAILED}
        image_error = failures[task_pb2.TASK_TYPE_IMAGE_GENERATION]
        voice_error = failures[task_pb2.TASK_TYPE_TTS_GENERATION]
        assert "unsafe or sensitive content" in image_error
        toasts = [(t["kind"], t["text"]) for t in calls["toast"]]
        assert ("error", f"图片生成失败: {image_error}") in toasts, toasts
        assert ("error", f"语音生成失败: {voice_error}") in toasts, toasts
        assert ("success", "正面图片已生成") in toasts and ("success", "语音已生成") in toasts, toasts
        assert (
            sum(kind == "info" and text.startswith("图片生成任务已提交 (task_") for kind, text in toasts) == 2
        )
        assert not any("[object" in text or "undefined" in text for _, text in toasts), toasts
        [view] = calls["updateCharacterView"]
        assert (view["characterId"], view["viewType"]) == ("char_001", "front")
        assert view["view"]["url"].startswith(f"{gateway}/media/")
        assert view["view"]["prompt"] == "a young swordsman in blue robes, front view, full body"
        [voice] = calls["updateCharacterVoice"]
        assert voice["voice"]["url"].startswith(f"{gateway}/media/")

        # The restart: the page's one stream resumed; its feed of the slow task is the task's log.
        survivor = seen["survivor"]
        assert survivor["states"][-1]["status"] == "completed", survivor
        assert_forward(survivor["states"], "survivor")
        log = await backend.event_log(survivor["id"])
        assert log[0]["eventType"] == "queued" and log[-1]["eventType"] == "completed"
        feed = survivor["feed"]
        if feed and feed[0]["sequence"] == 0:
            # The store had the QUEUED state first from submitImageTask's answer: the subscriber got
            # that state then, and not again with its event. Everything after comes from the stream.
            assert feed[0]["status"] == "queued", feed[0]
            feed, log = feed[1:], log[1:]
        assert [e["sequence"] for e in feed] == [e["sequence"] for e in log], (feed, log)
        assert survivor["connection"] == "live"
        # It went through "reconnecting" (the EventSource retrying, or the store diagnosing a refusal
        # and opening a new one with ?after=) and is live again.
        assert survivor["connections"][-1] == "live", survivor["connections"]
        assert survivor["connections"][-2].startswith("reconnecting"), survivor["connections"]

        # What the character record saved before the restart still loads.
        assert seen["saved"]["widths"] == [1024], seen["saved"]
        assert all(d > 0 for d in seen["saved"]["durations"]) and seen["saved"]["durations"], seen["saved"]
        status, content_type, body = await asyncio.to_thread(backend.get, view["view"]["url"][len(gateway) :])
        assert (status, content_type, body[:4]) == (200, "image/png", b"\x89PNG")
        for name in SCREENSHOTS:
            assert (await asyncio.to_thread((ARTIFACTS / name).read_bytes))[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"timings (ms): {seen['timings']}; restart {restart_seconds:.1f} s")
