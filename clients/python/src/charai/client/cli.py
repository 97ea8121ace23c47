"""The ``charai`` command: submit image and voice tasks, follow them live, list, fetch and cancel.

Built for two audiences at once. People get a live progress bar and readable errors; scripts get
``--json`` lines, plain progress lines whenever stdout is not a terminal, and exit codes that say
how the task ended (see ``EXIT_CODES``), so ``charai image ... && next-step`` does the right thing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import urllib.error
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc
from charai.client.client import CharaiClient, CharaiError, WatchResumeError
from charai.taskapi import TERMINAL_STATUSES
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

DEFAULT_TARGET = "127.0.0.1:50051"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_INVALID = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_UNAUTHENTICATED = 6
EXIT_NOT_FINISHED = 7
EXIT_ERROR = 8
EXIT_INTERRUPTED = 130

EXIT_CODES = (
    (EXIT_OK, "the task completed (or the command succeeded)"),
    (EXIT_FAILED, "the task failed (its error code and message are printed)"),
    (EXIT_CANCELLED, "the task was cancelled"),
    (EXIT_INVALID, "invalid input: bad arguments, or INVALID_ARGUMENT (each bad field is named)"),
    (EXIT_NOT_FOUND, "no such task (or it belongs to another tenant)"),
    (EXIT_UNAVAILABLE, "the gateway is unreachable or unavailable (or did not answer in time)"),
    (EXIT_UNAUTHENTICATED, "missing or wrong token (--token / CHARAI_TOKEN)"),
    (EXIT_NOT_FINISHED, "the task has not ended: --timeout expired, or download of a task still running"),
    (EXIT_ERROR, "any other error (over a limit, media fetch or file write failed, ...)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); the task itself goes on"),
)

_GRPC_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_UNAUTHENTICATED,
}
_STATUS_EXIT = {
    task_pb2.TASK_STATUS_COMPLETED: EXIT_OK,
    task_pb2.TASK_STATUS_FAILED: EXIT_FAILED,
    task_pb2.TASK_STATUS_CANCELLED: EXIT_CANCELLED,
}
_PRIORITIES = {
    "low": task_pb2.PRIORITY_LOW,
    "normal": task_pb2.PRIORITY_NORMAL,
    "high": task_pb2.PRIORITY_HIGH,
}
_TYPES = {"image": task_pb2.TASK_TYPE_IMAGE_GENERATION, "tts": task_pb2.TASK_TYPE_TTS_GENERATION}
_STATUSES = {
    "queued": task_pb2.TASK_STATUS_QUEUED,
    "running": task_pb2.TASK_STATUS_RUNNING,
    "completed": task_pb2.TASK_STATUS_COMPLETED,
    "failed": task_pb2.TASK_STATUS_FAILED,
    "cancelled": task_pb2.TASK_STATUS_CANCELLED,
}
_STATUS_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


class CliError(Exception):
    """A problem the CLI reports itself (not a gRPC status): a message and the exit code to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- naming helpers ---------------------------------------------------------------------------


def status_name(task: task_pb2.Task) -> str:
    return task_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()


def type_name(task: task_pb2.Task) -> str:
    return {task_pb2.TASK_TYPE_IMAGE_GENERATION: "image", task_pb2.TASK_TYPE_TTS_GENERATION: "tts"}.get(
        task.type, "?"
    )


def error_code_name(task: task_pb2.Task) -> str:
    return task_pb2.ErrorCode.Name(task.error.code).removeprefix("ERROR_CODE_")


def media_url(task: task_pb2.Task) -> str:
    if task.HasField("image_result"):
        return task.image_result.image_url
    if task.HasField("tts_result"):
        return task.tts_result.audio_url
    return ""


def to_json(message: Message) -> str:
    """Proto3 JSON (lowerCamelCase names, enum names) on one line, the form ``--json`` promises."""
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False, separators=(",", ":"))


def when(stamp: timestamp_pb2.Timestamp) -> str:
    local = stamp.ToDatetime(tzinfo=UTC).astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S")


def failure_text(task: task_pb2.Task) -> str:
    text = f"{error_code_name(task)}: {task.error.message}" if task.error.code else "no error recorded"
    status, code = task.error.provider_status, task.error.provider_code
    provider = " ".join(dict.fromkeys(part for part in (str(status or ""), code) if part))
    if provider:  # e.g. "(provider 400 1301)"; a code that repeats the HTTP status is shown once
        text += f" (provider {provider})"
    return text


def retry_text(task: task_pb2.Task) -> str:
    text = f"retry scheduled (attempt {task.attempt + 1} of {task.max_attempts})"
    if task.HasField("next_attempt_time"):
        wait = task.next_attempt_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
        text += f" in {max(wait.total_seconds(), 0.0):.1f} s"
    if task.error.code:
        text += f" after {failure_text(task)}"
    return text


def parse_pairs(pairs: Sequence[str] | None) -> dict[str, str]:
    """``k=v`` arguments into a dict; a malformed one is invalid input (exit 3), named as typed."""
    result: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata {pair!r}: expected key=value", EXIT_INVALID)
        result[key] = value
    return result


# -- output -----------------------------------------------------------------------------------


@dataclass
class Output:
    """Where and how to print: a live bar on a terminal, plain lines in a pipe, or JSON lines.

    Plain text goes through ``print`` rather than rich so that long URLs and ids are never wrapped
    or cut at 80 columns when a script reads them.
    """

    json_mode: bool
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        self.console = Console(file=self.stdout, highlight=False)
        self.live = not self.json_mode and self.console.is_terminal and not self.console.is_dumb_terminal
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            # A table read from a pipe should not be squeezed to rich's default 80 columns.
            self.console = Console(file=self.stdout, highlight=False, width=200)
        self.err = Console(file=self.stderr, highlight=False, soft_wrap=True)

    def line(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """A human remark (reconnecting, saved a file): stderr, so stdout stays parseable."""
        print(text, file=self.stderr, flush=True)

    def json(self, message: Message) -> None:
        self.line(to_json(message))

    def render(self, renderable: Any) -> None:
        """A rich table or grid; in a pipe without the padding rich adds to the end of each line."""
        if self.live:
            self.console.print(renderable)
            return
        with self.console.capture() as capture:
            self.console.print(renderable)
        for text in capture.get().splitlines():
            self.line(text.rstrip())

    def error(self, message: str, exit_code: int, error: CharaiError | None = None) -> None:
        if self.json_mode:
            body: dict[str, Any] = {"message": message, "exitCode": exit_code}
            if error is not None:
                body["code"] = error.code.name
                if error.fields:
                    body["fieldViolations"] = [{"field": f, "description": d} for f, d in error.fields]
            print(json.dumps({"error": body}, ensure_ascii=False), file=self.stderr, flush=True)
            return
        print(f"charai: {message}", file=self.stderr, flush=True)


class Follower:
    """Renders the events of one task as they arrive and remembers where the stream stands.

    The events come from ``CharaiClient.watch``, which resumes a dropped stream after the last
    sequence it yielded; this class only draws them, so a reconnect keeps the same bar and the
    printed sequence has neither gaps nor repeats.
    """

    def __init__(self, out: Output, task_id: str) -> None:
        self.out = out
        self.task_id = task_id
        self.last: task_pb2.Task | None = None
        self.reconnecting = False
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    def __enter__(self) -> Follower:
        if self.out.live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<9}"),
                BarColumn(bar_width=36),
                TaskProgressColumn(),
                TextColumn("{task.fields[stage]}"),
                TimeElapsedColumn(),
                console=self.out.console,
            )
            self._progress.start()
            self._bar = self._progress.add_task("waiting", total=100, stage="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _remark(self, text: str, style: str = "dim") -> None:
        if self._progress is not None:
            self._progress.console.print(f"[{style}]{escape(text)}[/]")
        else:
            self.out.note(text)

    def on_reconnect(self, attempt: int, reason: str, after: int) -> None:
        self.reconnecting = True
        where = f" after #{after}" if after else ""
        self._remark(f"stream dropped ({reason}); resuming{where}, attempt {attempt}", "yellow")
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, stage="reconnecting…")

    def event(self, event: task_pb2.TaskEvent) -> None:
        task = event.task
        if self.reconnecting:
            self.reconnecting = False
            self._remark(f"resumed at #{event.sequence}", "green")
        self.last = task
        if event.type == task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED:
            self._remark(retry_text(task), "yellow")
        if self.out.json_mode:
            self.out.json(event)
            return
        status = status_name(task)
        stage = task.stage if task.stage and task.stage != status else ""
        if task.status == task_pb2.TASK_STATUS_QUEUED and task.queue_position:
            stage = f"{stage} (position {task.queue_position})".strip()
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=task.progress, description=status, stage=escape(stage))
            return
        self.out.line(f"{task.id} #{event.sequence} {status} {task.progress}% {stage}".rstrip())

    def finish(self) -> int:
        """Stops the bar, prints the outcome and returns the exit code for it."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        task = self.last
        if task is None:  # pragma: no cover - watch always yields a snapshot first
            raise CliError(f"{self.task_id}: the stream ended without any event", EXIT_ERROR)
        return report_outcome(self.out, task)


def report_outcome(out: Output, task: task_pb2.Task) -> int:
    """The end of a followed task: the media URL on stdout, or the error on stderr."""
    code = _STATUS_EXIT.get(task.status, EXIT_NOT_FINISHED)
    if out.json_mode:
        return code
    if task.status == task_pb2.TASK_STATUS_COMPLETED:
        if out.live:
            detail = ""
            if task.HasField("image_result"):
                r = task.image_result
                detail = f" ({r.width}x{r.height} {r.content_type}, {r.size_bytes} bytes)"
            elif task.HasField("tts_result"):
                t = task.tts_result
                detail = f" ({t.duration_seconds:.2f} s {t.content_type}, {t.size_bytes} bytes)"
            out.console.print(f"[green]✔[/] {task.id} completed{escape(detail)}")
        out.line(media_url(task))
    elif task.status == task_pb2.TASK_STATUS_FAILED:
        out.error(f"{task.id} failed after {task.attempt} attempt(s): {failure_text(task)}", code)
    elif task.status == task_pb2.TASK_STATUS_CANCELLED:
        out.error(f"{task.id} was cancelled", code)
    return code


# -- commands ---------------------------------------------------------------------------------


@dataclass
class Session:
    """What a command needs, plus the task it is busy with (for the Ctrl-C and timeout messages)."""

    args: argparse.Namespace
    client: CharaiClient
    out: Output
    task_id: str = ""


async def follow(session: Session, task_id: str) -> int:
    session.task_id = task_id
    with Follower(session.out, task_id) as follower:
        async for event in session.client.watch(task_id, on_reconnect=follower.on_reconnect):
            follower.event(event)
        return follower.finish()


async def submitted(session: Session, task: task_pb2.Task) -> int:
    session.task_id = task.id
    out = session.out
    if session.args.no_follow:
        if out.json_mode:
            out.json(task)
        elif out.live:
            out.console.print(
                f"submitted {task.id} ({status_name(task)}); follow it with: charai watch {task.id}"
            )
        else:
            out.line(task.id)
        return EXIT_OK
    if out.live:
        what = f"{type_name(task)} for {task.metadata.get('characterId', '?')}"
        out.console.print(f"submitted [bold]{task.id}[/] ({escape(what)})")
    return await follow(session, task.id)


async def cmd_image(session: Session) -> int:
    a = session.args
    task = await session.client.create_image(
        a.character,
        a.prompt,
        resolution=a.resolution,
        view_type=a.view,
        character_name=a.name,
        costume_id=a.costume,
        metadata=_metadata(a),
        priority=_PRIORITIES[a.priority],
        request_id=a.request_id,
    )
    return await submitted(session, task)


async def cmd_tts(session: Session) -> int:
    a = session.args
    task = await session.client.create_tts(
        a.character,
        a.text,
        voice_style=a.voice,
        character_name=a.name,
        response_format=a.format,
        speed=a.speed,
        volume=a.volume,
        metadata=_metadata(a),
        priority=_PRIORITIES[a.priority],
        request_id=a.request_id,
    )
    return await submitted(session, task)


def _metadata(a: argparse.Namespace) -> dict[str, str]:
    metadata = parse_pairs(a.metadata)
    if a.category:
        metadata.setdefault("category", a.category)
    return metadata


async def cmd_watch(session: Session) -> int:
    # A unary call first: a wrong id or a down gateway fails at once instead of after the stream's
    # reconnect budget.
    await session.client.get(session.args.id)
    return await follow(session, session.args.id)


async def cmd_get(session: Session) -> int:
    task = await session.client.get(session.args.id)
    if session.out.json_mode:
        session.out.json(task)
    else:
        print_task(session.out, task)
    return EXIT_OK


async def cmd_cancel(session: Session) -> int:
    before = await session.client.get(session.args.id)
    task = await session.client.cancel(session.args.id)
    out = session.out
    if out.json_mode:
        out.json(task)
    elif before.status in TERMINAL_STATUSES:
        out.line(f"{task.id} had already ended ({status_name(task)}); nothing to cancel")
    else:
        out.line(f"{task.id} {status_name(task)}")
    return EXIT_OK


async def cmd_retry(session: Session) -> int:
    """Re-runs a failed task (the dead-letter view is ``charai list --status failed``)."""
    task = await session.client.retry(session.args.id)
    if session.out.json_mode:
        session.out.json(task)
    else:
        session.out.line(f"{task.id} {status_name(task)} (attempt budget now {task.max_attempts})")
    return EXIT_OK


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower() if value in enum.values() else str(value)


async def cmd_stats(session: Session) -> int:
    lanes = await session.client.queue_stats()
    out = session.out
    if out.json_mode:
        out.json(task_service_pb2.GetQueueStatsResponse(lanes=lanes))
        return EXIT_OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("TYPE", "PRIORITY"):
        table.add_column(name)
    for name in ("QUEUED", "WAITING RETRY", "RUNNING", "DONE/MIN", "PER SEC", "MEDIAN WAIT"):
        table.add_column(name, justify="right")
    for lane in lanes:
        wait = f"{lane.median_wait_seconds:.2f} s" if lane.wait_samples else "-"
        table.add_row(
            _enum_label(task_pb2.TaskType, lane.type, "TASK_TYPE_"),
            _enum_label(task_pb2.Priority, lane.priority, "PRIORITY_"),
            str(lane.depth),
            str(lane.waiting_retry),
            str(lane.in_flight),
            str(lane.completed_last_minute),
            f"{lane.throughput_per_second:.2f}",
            wait,
        )
    out.render(table)
    return EXIT_OK


async def cmd_list(session: Session) -> int:
    a = session.args
    metadata = parse_pairs(a.metadata)
    if a.character:
        metadata["characterId"] = a.character
    if a.category:
        metadata["category"] = a.category
    if a.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_INVALID)
    tasks: list[task_pb2.Task] = []
    stream = session.client.list(
        metadata,
        task_type=_TYPES.get(a.type or "", 0),
        status=_STATUSES.get(a.status or "", 0),
        page_size=min(a.limit + 1, 500),
    )
    async for task in stream:
        tasks.append(task)
        if len(tasks) > a.limit:
            break
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()  # ends the paging promptly
    more = len(tasks) > a.limit
    tasks = tasks[: a.limit]
    out = session.out
    shown = f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}"
    if out.json_mode:
        rows = [json_format.MessageToDict(t) for t in tasks]
        out.line(json.dumps(rows, ensure_ascii=False, separators=(",", ":")))
        if more:  # on stderr, so a script still reads one JSON array
            out.note(f"{shown} shown; more match, raise --limit to see them")
        return EXIT_OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=37)
    table.add_column("TYPE")
    table.add_column("STATUS")
    table.add_column("PROGRESS", justify="right")
    table.add_column("STAGE")
    table.add_column("CHARACTER", overflow="fold")
    table.add_column("CATEGORY", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    for task in tasks:
        status = status_name(task)
        style = _STATUS_STYLE.get(status, "")
        table.add_row(
            task.id,
            type_name(task),
            f"[{style}]{status}[/]" if style else status,
            f"{task.progress}%",
            escape(task.stage),
            escape(task.metadata.get("characterId", "")),
            escape(task.metadata.get("category", "")),
            when(task.create_time) if task.HasField("create_time") else "",
        )
    out.render(table)
    out.note(f"{shown} shown; more match, raise --limit to see them" if more else shown)
    return EXIT_OK


async def cmd_download(session: Session) -> int:
    a = session.args
    task = await session.client.get(a.id)
    session.task_id = task.id
    if task.status != task_pb2.TASK_STATUS_COMPLETED:
        status = status_name(task)
        if task.status == task_pb2.TASK_STATUS_FAILED:
            message = f"{task.id} failed ({failure_text(task)}): there is nothing to download"
        elif task.status == task_pb2.TASK_STATUS_CANCELLED:
            message = f"{task.id} was cancelled: there is nothing to download"
        else:
            message = (
                f"{task.id} is {status} ({task.progress}%), not completed: nothing to download yet"
                f" (wait with: charai watch {task.id})"
            )
        raise CliError(message, _STATUS_EXIT.get(task.status, EXIT_NOT_FINISHED))
    url = media_url(task)
    try:
        body = await session.client.download(url)
    except urllib.error.HTTPError as exc:
        raise CliError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}", EXIT_ERROR) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot fetch {url}: {reason}", EXIT_UNAVAILABLE) from None
    if a.output == "-":
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
        return EXIT_OK
    target = Path(a.output)
    partial = target.with_name(target.name + ".part")
    try:
        await asyncio.to_thread(partial.write_bytes, body)
        await asyncio.to_thread(partial.replace, target)  # never leave half a file under the real name
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise CliError(f"cannot write {target}: {exc.strerror or exc}", EXIT_ERROR) from None
    out = session.out
    if out.json_mode:
        out.json(task)
    else:
        content_type = task.image_result.content_type or task.tts_result.content_type
        out.line(f"saved {len(body)} bytes ({content_type}) to {target}")
    return EXIT_OK


def print_task(out: Output, task: task_pb2.Task) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    status = status_name(task)
    style = _STATUS_STYLE.get(status, "")
    rows: list[tuple[str, str]] = [
        ("id", task.id),
        ("type", type_name(task)),
        ("status", f"[{style}]{status}[/]" if style else status),
        ("progress", f"{task.progress}% {escape(task.stage)}"),
        ("priority", task_pb2.Priority.Name(task.priority).removeprefix("PRIORITY_").lower()),
        ("attempt", f"{task.attempt} of {task.max_attempts}"),
    ]
    if task.status == task_pb2.TASK_STATUS_QUEUED and task.queue_position:
        rows.append(("queue position", str(task.queue_position)))
    if task.HasField("image"):
        p = task.image
        rows += [("prompt", escape(p.prompt)), ("resolution", p.resolution), ("view", escape(p.view_type))]
    elif task.HasField("tts"):
        t = task.tts
        rows += [("text", escape(t.text)), ("voice", escape(t.voice_style))]
        if t.response_format:
            rows.append(("format", t.response_format))
    for key in sorted(task.metadata):
        rows.append((f"metadata.{escape(key)}", escape(task.metadata[key])))
    if task.HasField("create_time"):
        rows.append(("created", when(task.create_time)))
    if task.HasField("start_time"):
        rows.append(("started", when(task.start_time)))
    if task.HasField("end_time"):
        rows.append(("ended", when(task.end_time)))
    if task.HasField("next_attempt_time"):
        rows.append(("next attempt", when(task.next_attempt_time)))
    url = media_url(task)
    if url:
        rows.append(("url", escape(url)))
    if task.error.code:
        rows.append(("error", f"[red]{escape(failure_text(task))}[/]"))
    for label, value in rows:
        grid.add_row(label, value)
    out.render(grid)


# -- argument parsing -------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which would read as "task cancelled": use 3 instead."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)
    return f"""\
exit codes:
{codes}

output:
  On a terminal a live progress bar follows the task; when stdout is not a terminal each event
  is one plain line ("task_… #7 running 40% generating"). --json prints one JSON object per line
  (each task event, or the task, as proto3 JSON; `list` prints one JSON array) and no bar.
  The result URL (completed) is the last line on stdout; errors go to stderr.

examples:
  charai image --character char_001 --prompt "a young swordsman, front view" --resolution 1024x1024
  charai tts --character char_001 --text "Hello, I am Li Ming." --format mp3
  charai list --character char_001 --category character_design
  charai download task_… -o front.png
"""


def _common() -> Parser:
    """Options accepted before or after the command (defaults are filled in by ``parse_args``)."""
    common = Parser(add_help=False)
    g = common.add_argument_group("connection and output")
    s = argparse.SUPPRESS
    g.add_argument(
        "--target", default=s, help=f"gateway gRPC address (env CHARAI_TARGET, default {DEFAULT_TARGET})"
    )
    g.add_argument("--token", default=s, help="bearer token (env CHARAI_TOKEN)")
    g.add_argument(
        "--json", action="store_true", default=s, help="machine output: JSON lines, no progress bar"
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=s,
        metavar="SECONDS",
        help="give up after this long (default: 30 s per call, follow until the task ends)",
    )
    return common


def _character_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--character", required=True, metavar="ID", help="character id (metadata.characterId)")
    p.add_argument("--name", default="", help="character name")


def _submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", default="", help="metadata.category, to find the task again")
    p.add_argument("--metadata", action="extend", nargs="+", metavar="K=V", help="more metadata")
    p.add_argument("--priority", choices=list(_PRIORITIES), default="normal")
    p.add_argument(
        "--request-id", default="", metavar="R", help="idempotency key: a retry returns the same task"
    )
    p.add_argument(
        "--no-follow", action="store_true", help="print the task id (--json: the task) and return at once"
    )


def _submit_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``image`` and ``tts``: the character first, then what the task is, then how to submit it."""
    image = command("image", "submit an image task and follow it")
    _character_options(image)
    image.add_argument("--prompt", required=True, metavar="TEXT")
    image.add_argument("--view", default="front", help="view type (front, side, back, ...)")
    image.add_argument("--costume", default="", metavar="C", help="costume id")
    image.add_argument(
        "--resolution", default="", metavar="WxH", help="e.g. 1024x1024 (default: the model's)"
    )
    _submit_options(image)
    image.set_defaults(run=cmd_image)

    tts = command("tts", "submit a text-to-speech task and follow it")
    _character_options(tts)
    tts.add_argument("--text", required=True, metavar="TEXT")
    tts.add_argument("--voice", default="tongtong", help="voice style (default tongtong)")
    tts.add_argument("--format", choices=["wav", "pcm", "mp3"], default="", help="audio format (default wav)")
    tts.add_argument("--speed", type=float, default=None, help="speech speed, 0.5 to 2")
    tts.add_argument("--volume", type=float, default=None, help="volume, above 0 and at most 10")
    _submit_options(tts)
    tts.set_defaults(run=cmd_tts)


def build_parser() -> Parser:
    common = _common()
    parser = Parser(
        prog="charai",
        description="Submit, follow and fetch charai image and voice tasks.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    _submit_commands(command)

    watch = command("watch", "follow a task until it ends")
    watch.add_argument("id", metavar="ID")
    watch.set_defaults(run=cmd_watch)

    listing = command("list", "list tasks, newest first")
    listing.add_argument("--character", metavar="ID", help="metadata.characterId")
    listing.add_argument("--category", metavar="C", help="metadata.category")
    listing.add_argument(
        "--metadata", action="extend", nargs="+", metavar="K=V", help="more metadata filters"
    )
    listing.add_argument("--type", choices=list(_TYPES))
    listing.add_argument("--status", choices=list(_STATUSES))
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most N tasks (default 50)")
    listing.set_defaults(run=cmd_list)

    get = command("get", "show one task")
    get.add_argument("id", metavar="ID")
    get.set_defaults(run=cmd_get)

    cancel = command("cancel", "cancel a queued or running task")
    cancel.add_argument("id", metavar="ID")
    cancel.set_defaults(run=cmd_cancel)
    retry = command("retry", "re-run a failed task (queued again with a fresh attempt budget)")
    retry.add_argument("id", metavar="ID")
    retry.set_defaults(run=cmd_retry)
    stats = command("stats", "queue depth, running, throughput and median wait per lane (type x priority)")
    stats.set_defaults(run=cmd_stats)

    download = command("download", "save the image or audio of a completed task")
    download.add_argument("id", metavar="ID")
    download.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to save it ('-': stdout)"
    )
    download.set_defaults(run=cmd_download)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults: dict[str, Any] = {
        "target": os.environ.get("CHARAI_TARGET") or DEFAULT_TARGET,
        "token": os.environ.get("CHARAI_TOKEN", ""),
        "json": False,
        "timeout": None,
    }
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


# -- running ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, out: Output, session_box: list[Session]) -> int:
    timeout: float | None = args.timeout
    if timeout is not None and timeout <= 0:
        raise CliError("--timeout must be positive", EXIT_INVALID)
    rpc_timeout = min(30.0, timeout) if timeout else 30.0
    async with CharaiClient(args.target, args.token, rpc_timeout=rpc_timeout) as client:
        session = Session(args, client, out)
        session_box.append(session)
        command: Callable[[Session], Awaitable[int]] = args.run
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await command(session)
        except TimeoutError:
            if not scope.expired():
                raise
        what = f"; {session.task_id} goes on (charai watch {session.task_id})" if session.task_id else ""
        raise CliError(f"gave up after {timeout:g} s (--timeout){what}", EXIT_NOT_FINISHED)


def describe_error(exc: CharaiError, target: str, json_mode: bool) -> str:
    """One readable message per gRPC status; the bad fields one per line (in JSON they are listed
    in ``fieldViolations`` instead)."""
    code = exc.code
    if code == grpc.StatusCode.INVALID_ARGUMENT and exc.fields:
        if json_mode:
            return "invalid request"
        return "invalid request:\n" + "\n".join(f"  {f}: {d}" for f, d in exc.fields)
    if code == grpc.StatusCode.UNAVAILABLE:
        reason = exc.message or "unavailable"
        return f"cannot reach charai at {target} ({reason}); is the gateway up? (--target, CHARAI_TARGET)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"charai at {target} did not answer in time ({exc.message})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"not authenticated: {exc.message} (--token / CHARAI_TOKEN)"
    return f"{code.name}: {exc.message}"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    out = Output(json_mode=args.json)
    box: list[Session] = []
    try:
        code = asyncio.run(run(args, out, box))
    except CharaiError as exc:
        code = _GRPC_EXIT.get(exc.code, EXIT_ERROR)
        out.error(describe_error(exc, args.target, out.json_mode), code, exc)
    except WatchResumeError as exc:
        code = EXIT_UNAVAILABLE
        out.error(f"lost the stream from {args.target} and could not resume it: {exc}", code)
    except CliError as exc:
        code = exc.exit_code
        out.error(exc.message, code)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        task_id = box[0].task_id if box else ""
        out.error(
            f"interrupted; {task_id} goes on (charai watch {task_id})" if task_id else "interrupted", code
        )
    except BrokenPipeError:
        # The reader went away (`charai list | head`): nothing left to say to it.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
