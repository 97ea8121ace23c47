"""The seed's JSON out: tasks and events as its frontend reads them, and events as Server-Sent Events."""

from __future__ import annotations

import json
from typing import Any

from charai.taskapi import (
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    event_type_label,
    status_label,
)
from charai.taskapi.json import task_json

__all__ = ["event_json", "event_name", "sse_block", "task_json"]
from charai.tasks.v1 import task_pb2


def event_name(event: task_pb2.TaskEvent) -> str:
    """The seed's WebSocket event name of a TaskEvent."""
    if event.type in TERMINAL_EVENTS:
        return f"task:{event_type_label(event.type)}"
    if event.type == task_pb2.TASK_EVENT_TYPE_SNAPSHOT and event.task.status in TERMINAL_STATUSES:
        return f"task:{status_label(event.task.status)}"
    return "task:progress"


def event_json(event: task_pb2.TaskEvent) -> dict[str, Any]:
    """The seed's event data ``{taskId, progress, status, stage, metadata, result?, error?}``, plus
    the sequence, charai's event type and the whole task (what ``subscribeToTask`` callbacks get)."""
    task = task_json(event.task)
    data: dict[str, Any] = {
        "taskId": task["id"],
        "progress": task["progress"],
        "status": task["status"],
        "stage": task["stage"],
        "metadata": task["metadata"],
    }
    if task["result"] is not None:
        data["result"] = task["result"]
    if task["error"] is not None:
        data["error"] = task["error"]
        data["errorDetail"] = task["errorDetail"]
    data["sequence"] = event.sequence
    data["eventType"] = event_type_label(event.type)
    data["task"] = task
    return data


def sse_block(event: task_pb2.TaskEvent, *, many: bool = False) -> bytes:
    """One Server-Sent Event.

    One task's stream (``many`` False): each event's ``id:`` is its sequence (a task's events come
    in order, so resuming after it misses nothing); heartbeats are comments (they keep proxies
    and the socket awake without waking the page).

    A stream of many tasks (``many``): events of different tasks may arrive out of sequence order
    (a live event can overtake one that is read back from the log), so an event's own sequence is
    no safe place to resume from. Its events carry no ``id:``; its heartbeats are ``event:
    heartbeat`` with ``id:`` and ``data: {"resumePoint": N}``, N being the stream's floor (every
    matching event up to N was delivered). The EventSource then resumes from N by itself, a page
    can read N (a listener for ``heartbeat``), and events repeated by a resume are recognised by
    their ``sequence`` (per task)."""
    if event.type == task_pb2.TASK_EVENT_TYPE_HEARTBEAT:
        if many and event.sequence > 0:
            data = json.dumps({"resumePoint": event.sequence}, separators=(",", ":"))
            return f"event: heartbeat\nid: {event.sequence}\ndata: {data}\n\n".encode()
        return b": heartbeat\n\n"
    lines = []
    if event.sequence > 0 and not many:
        lines.append(f"id: {event.sequence}")
    lines.append(f"event: {event_name(event)}")
    lines.append("data: " + json.dumps(event_json(event), ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()
