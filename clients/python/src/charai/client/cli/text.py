"""How tasks read as text: names, URLs, times, failures; and ``k=v`` arguments."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from charai.client.cli.exits import EXIT_INVALID, CliError
from charai.taskapi import error_code_name
from charai.tasks.v1 import task_pb2
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

#: The CLI's short names of the task types (``--type image``).
TYPES = {"image": task_pb2.TASK_TYPE_IMAGE_GENERATION, "tts": task_pb2.TASK_TYPE_TTS_GENERATION}
_TYPE_NAMES = {value: name for name, value in TYPES.items()}
#: The colour of a status in tables.
STATUS_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def type_name(task: task_pb2.Task) -> str:
    return _TYPE_NAMES.get(task.type, "?")


def media_url(task: task_pb2.Task) -> str:
    if task.HasField("image_result"):
        return task.image_result.image_url
    if task.HasField("tts_result"):
        return task.tts_result.audio_url
    return ""


def usage_text(usage: task_pb2.Usage) -> str:
    """A task's usage on one line: ``1 image 1024x1024, $0.0400 (openai dall-e-3)``."""
    if usage.reused:
        return f"reused another task's result, $0 ({usage.provider} {usage.model})"
    parts = []
    if usage.images:
        size = f" {usage.image_size}" if usage.image_size else ""
        quality = f" {usage.image_quality}" if usage.image_quality else ""
        parts.append(f"{usage.images} image{'s' if usage.images != 1 else ''}{size}{quality}")
    if usage.speech_characters:
        parts.append(f"{usage.speech_characters} characters, {usage.audio_seconds:.1f} s of audio")
    what = ", ".join(parts) or f"{usage.calls} calls"
    return f"{what}, ${usage.cost_usd:.4f} ({usage.provider} {usage.model})"


def to_json(message: Message) -> str:
    """Proto3 JSON (lowerCamelCase names, enum names) on one line, the form ``--json`` promises."""
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False, separators=(",", ":"))


def when(stamp: timestamp_pb2.Timestamp) -> str:
    local = stamp.ToDatetime(tzinfo=UTC).astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S")


def eta_text(task: task_pb2.Task, now: float | None = None) -> str:
    """``starts in ~42 s`` for a queued task, ``ends in ~3 min`` for a running one; '' when the
    store has no estimate (no task of its lane started or ended lately)."""
    if task.status == task_pb2.TASK_STATUS_QUEUED and task.HasField("estimated_start_time"):
        verb, stamp = "starts", task.estimated_start_time
    elif task.status == task_pb2.TASK_STATUS_RUNNING and task.HasField("estimated_end_time"):
        verb, stamp = "ends", task.estimated_end_time
    else:
        return ""
    now = datetime.now(UTC).timestamp() if now is None else now
    seconds = round(stamp.ToMicroseconds() / 1e6 - now)
    if seconds <= 1:
        return f"({verb} any moment)"
    return f"({verb} in ~{seconds} s)" if seconds < 90 else f"({verb} in ~{round(seconds / 60)} min)"


def failure_text(task: task_pb2.Task) -> str:
    text = (
        f"{error_code_name(task.error.code)}: {task.error.message}"
        if task.error.code
        else "no error recorded"
    )
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
