"""The ``charai`` CLI, run as the installed console script against the real stack.

The stack here has client tokens switched on, so every call also proves that ``CHARAI_TOKEN``
reaches the gateway (and that a missing token gives exit code 6). What a script relies on is
checked: exit codes, the URL as the last line, ``--json`` lines, and a follow that survives a
gateway restart without losing or repeating an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import sys
import threading
import uuid
import wave
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from charai.client import CharaiClient
from charai.devstack.stack import Stack, free_port
from charai.tasks.v1 import task_pb2

from tests.conftest import eventually

from .conftest import FAST_SETTINGS
from .helpers import history, unique

CHARAI = str(Path(sys.executable).parent / "charai")
TOKEN = "cli-test-token"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: Any) -> AsyncIterator[Stack]:
    """The e2e stack with client tokens on (auth is what a deployed gateway runs with), and an
    image timeout long enough for the 6 s provider call the restart test follows."""
    env = dict(FAST_SETTINGS, CHARAI_API_KEYS=f"{TOKEN}=tenant_cli", CHARAI_IMAGE_TIMEOUT_SECONDS="15")
    echo = sys.stderr if os.environ.get("CHARAI_TEST_ECHO") else None
    async with Stack(
        Path(tmp_path_factory.mktemp("cli-stack")),
        env,
        free_ports=True,
        echo=echo,
        emulator_args=["--latency", "0.05:0.15", "--async-poll-steps", "2"],
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(stack: Stack) -> AsyncIterator[CharaiClient]:
    async with CharaiClient(stack.gateway_grpc, TOKEN) as c:
        yield c


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli_env(stack: Stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(CHARAI_TARGET=stack.gateway_grpc, CHARAI_TOKEN=TOKEN, COLUMNS="200")
    env.update(extra)
    return env


async def spawn(stack: Stack, *args: str, env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        CHARAI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else cli_env(stack),
    )


async def finish(process: asyncio.subprocess.Process, timeout: float = 30.0) -> Run:
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"charai did not end within {timeout} s:\n{out.decode()}\n{err.decode()}"
        ) from None
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def charai(
    stack: Stack, *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Run:
    return await finish(await spawn(stack, *args, env=env), timeout)


def char() -> str:
    return f"char_cli_{uuid.uuid4().hex[:10]}"


def json_lines(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.lines]


def listed_ids(run: Run) -> list[str]:
    """The ids in ``list --json`` output, which must be exactly one line holding one JSON array."""
    assert run.code == 0 and len(run.lines) == 1, run
    rows: list[dict[str, Any]] = json.loads(run.lines[0])
    return [row["id"] for row in rows]


def sequences(events: list[dict[str, Any]]) -> list[int]:
    return [int(e.get("sequence", 0)) for e in events]


# -- submit and follow -----------------------------------------------------------------------


async def test_image_follows_to_completion_and_prints_the_url(stack: Stack) -> None:
    character = char()
    run = await charai(
        stack, "image", "--character", character, "--prompt", unique("a swordsman") + " [[latency:0.5]]",
        "--resolution", "1024x1024", "--category", "design", "--metadata", "pose=standing",
    )  # fmt: skip
    assert run.code == 0, run
    url = run.lines[-1]
    assert url.startswith(stack.gateway_http + "/media/") and ".png" in url, run
    progress = run.lines[:-1]
    # Not a terminal: one plain line per event, "task_x #seq status percent stage".
    assert progress and all(re.fullmatch(r"task_[0-9a-f]{32} #\d+ \w+ \d+%.*", line) for line in progress), (
        run
    )
    assert any(" running " in line for line in progress), run
    assert progress[-1].split()[2:4] == ["completed", "100%"], run
    assert "\x1b[" not in run.out, "escape codes in a pipe"


async def test_json_lines_parse_and_end_with_the_completed_event(stack: Stack) -> None:
    run = await charai(
        stack, "--json", "tts", "--character", char(), "--text", unique("hello"), "--format", "mp3"
    )
    assert run.code == 0, run
    events = json_lines(run)
    assert events[0]["type"] == "TASK_EVENT_TYPE_SNAPSHOT", run
    last = events[-1]
    assert (
        last["type"] == "TASK_EVENT_TYPE_COMPLETED" and last["task"]["status"] == "TASK_STATUS_COMPLETED"
    ), run
    assert last["task"]["ttsResult"]["contentType"] == "audio/mpeg", last
    seqs = sequences(events)
    assert seqs == sorted(set(seqs)), f"sequences repeat or go back: {seqs}"
    # A later `get --json` is the same task as proto3 JSON.
    got = json_lines(await charai(stack, "get", last["task"]["id"], "--json"))
    assert len(got) == 1 and got[0]["ttsResult"]["audioUrl"] == last["task"]["ttsResult"]["audioUrl"]


async def test_failed_task_exits_1_with_its_error_code(stack: Stack) -> None:
    run = await charai(stack, "tts", "--character", char(), "--text", unique("rude words") + " [[content]]")
    assert run.code == 1, run
    assert "CONTENT_REJECTED" in run.err and "failed" in run.err, run
    assert "Traceback" not in run.err


async def test_invalid_input_exits_3_and_names_the_field(stack: Stack) -> None:
    run = await charai(stack, "image", "--character", char(), "--prompt", "")
    assert run.code == 3, run
    assert "image.prompt: must not be empty" in run.err, run
    usage = await charai(stack, "image", "--character", char())  # --prompt missing: argparse
    assert usage.code == 3 and "--prompt" in usage.err, usage
    bad = await charai(stack, "tts", "--character", char(), "--text", "x", "--metadata", "novalue")
    assert bad.code == 3 and "novalue" in bad.err, bad
    for timeout in ("-1", "0", "nan"):  # NaN was taken, and ended a plain list with "gave up"
        refused = await charai(stack, "--timeout", timeout, "list", "--limit", "1")
        assert refused.code == 3 and "--timeout must be positive" in refused.err, (timeout, refused)


# -- get, list, cancel, download -------------------------------------------------------------


async def test_get_list_download_and_cancel(stack: Stack, tmp_path: Path) -> None:
    character = char()
    image = await charai(
        stack, "image", "--character", character, "--prompt", unique("a mage"), "--category", "design",
        "--no-follow",
    )  # fmt: skip
    assert image.code == 0 and re.fullmatch(r"task_[0-9a-f]{32}", image.out.strip()), image
    image_id = image.out.strip()
    assert (await charai(stack, "watch", image_id)).code == 0
    voice = await charai(
        stack, "--json", "tts", "--character", character, "--text", unique("a long speech") + " [[hang:30]]",
        "--no-follow",
    )  # fmt: skip
    voice_id = json_lines(voice)[0]["id"]

    got = await charai(stack, "get", image_id)
    assert got.code == 0 and re.search(r"status\s+completed", got.out) and image_id in got.out, got

    table = await charai(stack, "list", "--character", character)
    assert table.code == 0 and image_id in table.out and voice_id in table.out, table
    assert table.out.index(voice_id) < table.out.index(image_id), "newest first"
    only = await charai(stack, "list", "--character", character, "--category", "design", "--json")
    assert listed_ids(only) == [image_id], only
    limited = await charai(stack, "list", "--character", character, "--limit", "1", "--json")
    assert listed_ids(limited) == [voice_id] and "more match" in limited.err, limited

    png = tmp_path / "front.png"
    saved = await charai(stack, "download", image_id, "-o", str(png))
    assert saved.code == 0, saved
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    early = await charai(stack, "download", voice_id, "-o", str(tmp_path / "early.wav"))
    assert early.code == 7 and "not completed" in early.err, early
    assert not (tmp_path / "early.wav").exists()

    cancelled = await charai(stack, "cancel", voice_id)
    assert cancelled.code == 0 and cancelled.out.strip() == f"{voice_id} cancelled", cancelled
    assert (await charai(stack, "watch", voice_id)).code == 2
    refused = await charai(stack, "download", voice_id, "-o", str(tmp_path / "v.wav"))
    assert refused.code == 2 and "cancelled" in refused.err, refused

    wav_task = json_lines(await charai(stack, "--json", "tts", "--character", character, "--text", "hi"))[-1]
    wav = tmp_path / "voice.wav"
    assert (await charai(stack, "download", wav_task["task"]["id"], "-o", str(wav))).code == 0
    with wave.open(str(wav)) as audio:
        assert audio.getnframes() > 0


async def test_not_found_unauthenticated_and_unreachable(stack: Stack) -> None:
    missing = await charai(stack, "get", "task_" + "0" * 32)
    assert missing.code == 4 and "not found" in missing.err, missing

    anonymous = await charai(stack, "list", env=cli_env(stack, CHARAI_TOKEN=""))
    assert anonymous.code == 6 and "token" in anonymous.err, anonymous
    wrong = await charai(stack, "get", "task_" + "0" * 32, "--token", "not-the-token")
    assert wrong.code == 6, wrong

    nowhere = f"127.0.0.1:{free_port()}"
    down = await charai(stack, "image", "--character", char(), "--prompt", "x", "--target", nowhere)
    assert down.code == 5, down
    assert len(down.err.strip().splitlines()) == 1 and nowhere in down.err, down
    assert "Traceback" not in down.err and not down.out, down


# -- a gateway restart while following ---------------------------------------------------------


class PtyCli:
    """``charai`` on a pseudo-terminal, so it draws its live bar; the output is read by a thread."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.args = args
        self.env = env
        self.chunks: list[bytes] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: threading.Thread | None = None
        self._master = -1

    async def start(self) -> None:
        self._master, slave = pty.openpty()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, stdin=slave, stdout=slave, stderr=slave, env=dict(self.env)
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: every writer closed its end
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return ANSI.sub("", b"".join(self.chunks).decode(errors="replace"))

    async def wait_for(self, text: str, timeout: float) -> None:
        await eventually(lambda: text in self.text, timeout=timeout)

    async def wait(self, timeout: float) -> tuple[int, str]:
        assert self.process is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.process.wait()
        finally:
            await self.close()
        return code, self.text

    async def close(self) -> None:
        """Kills the process if it still runs and releases the terminal; safe to call twice."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
            self._reader = None
        if self._master >= 0:
            os.close(self._master)
            self._master = -1


@contextlib.asynccontextmanager
async def reaped(*processes: asyncio.subprocess.Process | PtyCli) -> AsyncIterator[None]:
    """However the block ends, no charai process outlives it."""
    try:
        yield
    finally:
        for process in processes:
            if isinstance(process, PtyCli):
                await process.close()
            elif process.returncode is None:
                process.kill()
                await process.communicate()


async def read_until(stream: asyncio.StreamReader, predicate: Any, timeout: float) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not lines or not predicate(lines[-1]):
            raw = await stream.readline()
            assert raw, f"stream ended early: {lines}"
            lines.append(raw.decode())
    return lines


async def test_following_survives_a_gateway_restart(stack: Stack, client: CharaiClient) -> None:
    # Three followers of one running task: --json (submits it), plain lines, and the live bar on a
    # terminal. The gateway is restarted under all three; each must resume where it stood.
    # A provider call of 6 s: long enough that the task still runs when the gateway goes down, even
    # on a busy machine where starting the three followers takes a few seconds.
    prompt = unique("slow portrait") + " [[latency:6]]"
    json_cli = await spawn(stack, "--json", "image", "--character", char(), "--prompt", prompt)
    async with reaped(json_cli):
        assert json_cli.stdout is not None
        head = await read_until(json_cli.stdout, lambda line: '"TASK_STATUS_RUNNING"' in line, 15)
        task_id = json.loads(head[0])["task"]["id"]
        plain_cli = await spawn(stack, "watch", task_id)
        bar_cli = PtyCli([CHARAI, "watch", task_id], cli_env(stack))
        async with reaped(plain_cli, bar_cli):
            await bar_cli.start()
            assert plain_cli.stdout is not None
            plain_head = await read_until(plain_cli.stdout, lambda line: " running " in line, 15)
            await bar_cli.wait_for("running", 15)

            before = await client.get(task_id)
            assert before.status == task_pb2.TASK_STATUS_RUNNING, "the task ended before the restart"
            await stack.restart_service("gateway")  # back once its health says SERVING

            json_run = await finish(json_cli, 40)
            plain_run = await finish(plain_cli, 40)
            bar_code, bar_text = await bar_cli.wait(40)
    log = await history(client, task_id)

    # --json: every event once, in order, ending with COMPLETED, and nothing after the snapshot missed.
    assert json_run.code == 0, json_run
    events = [json.loads(line) for line in head] + json_lines(json_run)
    seqs = sequences(events)
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), f"repeated or out of order: {seqs}"
    assert events[-1]["type"] == "TASK_EVENT_TYPE_COMPLETED", json_run
    assert seqs[1:] == [e.sequence for e in log if e.sequence > seqs[0]], (seqs, [e.sequence for e in log])
    assert "resum" in json_run.err, f"no reconnect happened:\n{json_run}"

    # Plain lines: the same promise, read from "task_x #seq ..." lines; the URL is the last line.
    assert plain_run.code == 0, plain_run
    plain = [*plain_head, *plain_run.out.splitlines()]
    plain_seqs = [int(m.group(1)) for line in plain if (m := re.match(rf"{task_id} #(\d+) ", line))]
    assert plain_seqs == sorted(set(plain_seqs)), f"repeated or out of order: {plain_seqs}"
    assert plain_seqs[1:] == [e.sequence for e in log if e.sequence > plain_seqs[0]], plain_seqs
    assert plain_run.lines[-1].startswith(stack.gateway_http + "/media/"), plain_run

    # The live bar: kept across the restart (one process, told the user it resumed), and finished.
    assert bar_code == 0, bar_text
    assert "stream dropped" in bar_text and "resumed at #" in bar_text, bar_text
    assert "100%" in bar_text and f"{task_id} completed" in bar_text, bar_text
    assert f"{stack.gateway_http}/media/{task_id}" in bar_text, bar_text
