"""Printing: a live bar on a terminal, plain lines in a pipe, or JSON lines; and following a task."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from charai.client.cli.exits import EXIT_ERROR, EXIT_NOT_FINISHED, STATUS_EXIT, CliError
from charai.client.cli.text import eta_text, failure_text, media_url, retry_text, to_json
from charai.client.client import CharaiError
from charai.taskapi import status_label
from charai.tasks.v1 import task_pb2
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
        status = status_label(task.status)
        stage = task.stage if task.stage and task.stage != status else ""
        if task.status == task_pb2.TASK_STATUS_QUEUED and task.queue_position:
            stage = f"{stage} (position {task.queue_position})".strip()
        stage = f"{stage} {eta_text(task)}".strip()
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
    code = STATUS_EXIT.get(task.status, EXIT_NOT_FINISHED)
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
