"""The commands: each takes a :class:`Session` and returns the exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import urllib.error
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from charai.client.cli.exits import (
    EXIT_ERROR,
    EXIT_INVALID,
    EXIT_NOT_FINISHED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    STATUS_EXIT,
    CliError,
)
from charai.client.cli.output import Follower, Output
from charai.client.cli.text import TYPES, failure_text, media_url, parse_pairs, type_name
from charai.client.cli.views import (
    budgets_table,
    lanes_table,
    print_task,
    providers_table,
    task_table,
    usage_table,
)
from charai.client.client import CharaiClient
from charai.taskapi import PRIORITIES, STATUSES, TERMINAL_STATUSES, status_label
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf import json_format
from rich.markup import escape


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
                f"submitted {task.id} ({status_label(task.status)}); follow it with: charai watch {task.id}"
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
        priority=PRIORITIES[a.priority],
        request_id=a.request_id,
        webhook=_webhook(a),
        seed=a.seed,
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
        priority=PRIORITIES[a.priority],
        request_id=a.request_id,
        webhook=_webhook(a),
        reuse=a.reuse,
    )
    return await submitted(session, task)


def _webhook(a: argparse.Namespace) -> task_pb2.Webhook | None:
    if not a.webhook:
        return None
    return task_pb2.Webhook(url=a.webhook, events=a.webhook_events or [])


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
        out.line(f"{task.id} had already ended ({status_label(task.status)}); nothing to cancel")
    else:
        out.line(f"{task.id} {status_label(task.status)}")
    return EXIT_OK


async def cmd_retry(session: Session) -> int:
    """Re-runs a failed task (the dead-letter view is ``charai list --status failed``)."""
    task = await session.client.retry(session.args.id)
    if session.out.json_mode:
        session.out.json(task)
    else:
        session.out.line(f"{task.id} {status_label(task.status)} (attempt budget now {task.max_attempts})")
    return EXIT_OK


async def cmd_batch(session: Session) -> int:
    """BatchCreateTasks from a file of ``{"requests": [CreateTaskRequest, ...]}`` (proto3 JSON):
    all or none; prints each task's id in request order (``--json``: the tasks)."""
    path = session.args.file
    try:
        text = sys.stdin.read() if path == "-" else await asyncio.to_thread(Path(path).read_text)
        batch = json_format.Parse(text, task_service_pb2.BatchCreateTasksRequest())
    except (OSError, json_format.ParseError) as exc:
        raise CliError(f"{path}: {exc}", EXIT_INVALID) from None
    tasks = await session.client.create_many(batch.requests)
    if session.out.json_mode:
        session.out.json(task_service_pb2.BatchCreateTasksResponse(tasks=tasks))
    else:
        for task in tasks:
            session.out.line(task.id)
    return EXIT_OK


async def cmd_webhook_secret(session: Session) -> int:
    """Prints the tenant's webhook secret (``--rotate``: a new one; the old keeps signing a while)."""
    out = session.out
    if session.args.rotate:
        rotated = await session.client.rotate_webhook_secret()
        if out.json_mode:
            out.json(rotated)
        else:
            until = rotated.previous_expire_time.ToJsonString()
            out.line(rotated.secret)
            out.line(f"the previous secret signs too until {until}")
        return EXIT_OK
    secret = await session.client.webhook_secret()
    if out.json_mode:
        out.json(task_service_pb2.GetWebhookSecretResponse(secret=secret))
    else:
        out.line(secret)
    return EXIT_OK


_DELIVERY_STATUS = task_service_pb2.WebhookDeliveryStatus
_DELIVERY_PREFIX = "WEBHOOK_DELIVERY_STATUS_"


async def cmd_webhook_list(session: Session) -> int:
    a = session.args
    status = (
        task_service_pb2.WebhookDeliveryStatus.Value(f"WEBHOOK_DELIVERY_STATUS_{a.status.upper()}")
        if a.status
        else 0
    )
    found = await session.client.webhook_deliveries(
        task_id=a.task or "", url=a.url or "", status=status, limit=a.limit
    )
    out = session.out
    if out.json_mode:
        out.json(task_service_pb2.ListWebhookDeliveriesResponse(deliveries=found))
        return EXIT_OK
    for d in found:
        state = (
            task_service_pb2.WebhookDeliveryStatus.Name(d.status)
            .removeprefix("WEBHOOK_DELIVERY_STATUS_")
            .lower()
        )
        answers = ",".join(str(x.http_status) if x.http_status else "none" for x in d.attempts) or "-"
        last = d.attempts[-1].error if d.attempts else ""
        out.line(
            f"{d.id} {d.task_id} {d.event_type} {state} attempts={answers} {d.url}"
            + (f" ({last})" if last else "")
        )
    return EXIT_OK


async def cmd_webhook_redeliver(session: Session) -> int:
    a = session.args
    count = await session.client.redeliver_webhook(a.id or "", a.since)
    out = session.out
    if out.json_mode:
        out.json(task_service_pb2.RedeliverWebhookResponse(redelivered=count))
    else:
        out.line(f"{count} queued again")
    return EXIT_OK


async def cmd_stats(session: Session) -> int:
    stats = await session.client.operations_stats()
    out = session.out
    if out.json_mode:
        out.json(stats)
    else:
        out.render(lanes_table(list(stats.lanes)))
        if stats.providers:  # after a blank line: the provider credentials' limits and breakers
            out.line("")
            out.render(providers_table(list(stats.providers)))
    return EXIT_OK


async def cmd_usage(session: Session) -> int:
    a = session.args
    response = await session.client.usage(
        tenant=a.tenant or "", all_tenants=a.all_tenants, start_day=a.start_day or "", end_day=a.end_day or ""
    )
    out = session.out
    if out.json_mode:
        out.json(response)
        return EXIT_OK
    out.note(f"usage from {response.start_day} to {response.end_day} (UTC)")
    if response.rows:
        out.render(usage_table(response))
    else:
        out.note("nothing metered in these days")
    if response.budgets:
        out.render(budgets_table(list(response.budgets)))
    return EXIT_OK


def _list_filter(a: argparse.Namespace) -> dict[str, str]:
    """The metadata to match: ``--metadata`` pairs, ``--character`` and ``--category``."""
    metadata = parse_pairs(a.metadata)
    if a.character:
        metadata["characterId"] = a.character
    if a.category:
        metadata["category"] = a.category
    return metadata


async def _first(stream: AsyncIterator[task_pb2.Task], count: int) -> list[task_pb2.Task]:
    """At most ``count`` tasks of ``stream``; the paging ends as soon as they are in."""
    tasks: list[task_pb2.Task] = []
    async for task in stream:
        tasks.append(task)
        if len(tasks) >= count:
            break
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()  # ends the paging promptly
    return tasks


async def cmd_list(session: Session) -> int:
    a = session.args
    metadata = _list_filter(a)
    if a.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_INVALID)
    stream = session.client.list(
        metadata,
        task_type=TYPES.get(a.type or "", 0),
        status=STATUSES.get(a.status or "", 0),
        page_size=min(a.limit + 1, 500),
    )
    tasks = await _first(stream, a.limit + 1)  # one more than shown: are there more?
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
    out.render(task_table(tasks))
    out.note(f"{shown} shown; more match, raise --limit to see them" if more else shown)
    return EXIT_OK


async def cmd_download(session: Session) -> int:
    a = session.args
    task = await session.client.get(a.id)
    session.task_id = task.id
    if task.status != task_pb2.TASK_STATUS_COMPLETED:
        status = status_label(task.status)
        if task.status == task_pb2.TASK_STATUS_FAILED:
            message = f"{task.id} failed ({failure_text(task)}): there is nothing to download"
        elif task.status == task_pb2.TASK_STATUS_CANCELLED:
            message = f"{task.id} was cancelled: there is nothing to download"
        else:
            message = (
                f"{task.id} is {status} ({task.progress}%), not completed: nothing to download yet"
                f" (wait with: charai watch {task.id})"
            )
        raise CliError(message, STATUS_EXIT.get(task.status, EXIT_NOT_FINISHED))
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
