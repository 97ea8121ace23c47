"""Tables: the task list, one task's details, the queue lanes, the provider credentials."""

from __future__ import annotations

from charai.client.cli.output import Output
from charai.client.cli.text import STATUS_STYLE, failure_text, media_url, type_name, usage_text, when
from charai.taskapi import error_code_label, priority_label, status_label, type_label
from charai.tasks.v1 import task_pb2, task_service_pb2
from rich.markup import escape
from rich.table import Table


def task_table(tasks: list[task_pb2.Task]) -> Table:
    """``charai list``: one row per task."""
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
        status = status_label(task.status)
        style = STATUS_STYLE.get(status, "")
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
    return table


def lanes_table(lanes: list[task_service_pb2.LaneStats]) -> Table:
    """``charai stats``: one row per lane (type x priority)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("TYPE", "PRIORITY"):
        table.add_column(name)
    for name in ("QUEUED", "WAITING RETRY", "RUNNING", "DONE/MIN", "PER SEC", "MEDIAN WAIT"):
        table.add_column(name, justify="right")
    for lane in lanes:
        wait = f"{lane.median_wait_seconds:.2f} s" if lane.wait_samples else "-"
        table.add_row(
            type_label(lane.type),
            priority_label(lane.priority),
            str(lane.depth),
            str(lane.waiting_retry),
            str(lane.in_flight),
            str(lane.completed_last_minute),
            f"{lane.throughput_per_second:.2f}",
            wait,
        )
    return table


def providers_table(providers: list[task_service_pb2.ProviderState]) -> Table:
    """``charai stats``, second table: one row per provider credential and model, with the
    limit and breaker every worker shares (the credential is a hash, never the key)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("PROVIDER", "TYPE", "MODEL", "CREDENTIAL", "BREAKER"):
        table.add_column(name)
    for name in ("LIMIT", "IN FLIGHT", "RATE/S", "WORKERS"):
        table.add_column(name, justify="right")
    table.add_column("UNTIL", no_wrap=True)
    breakers = {
        task_service_pb2.BREAKER_STATE_CLOSED: "closed",
        task_service_pb2.BREAKER_STATE_OPEN: "[red]open[/]",
        task_service_pb2.BREAKER_STATE_HALF_OPEN: "[yellow]half-open[/]",
    }
    for p in providers:
        breaker = breakers.get(p.breaker_state, "?")
        if p.breaker_reason:
            breaker += f" ({error_code_label(p.breaker_reason)})"
        until = ""
        if p.HasField("breaker_retry_time"):
            until = f"probe {when(p.breaker_retry_time)}"
        elif p.HasField("paused_until"):
            until = f"paused {when(p.paused_until)}"
        table.add_row(
            escape(p.dialect),
            type_label(p.type),
            escape(p.model),
            p.credential_id,
            breaker,
            str(p.limit) if p.limit else ("1 (new key)" if not p.verified else "-"),
            str(p.in_flight),
            f"{p.rate_per_second:.1f}" if p.rate_per_second else "-",
            str(p.workers),
            until,
        )
    return table


def usage_table(response: task_service_pb2.GetUsageResponse) -> Table:
    """``charai usage``: one row per day, tenant, provider and model, then the totals."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_footer=len(response.rows) > 1)
    for name in ("DAY", "TENANT", "PROVIDER", "MODEL"):
        table.add_column(name, footer="total" if name == "DAY" else "")
    rows = response.rows
    sums = (
        str(sum(r.calls for r in rows)),
        str(sum(r.images for r in rows)),
        str(sum(r.speech_characters for r in rows)),
        f"{sum(r.audio_seconds for r in rows):.1f}",
        f"{sum(r.cost_usd for r in rows):.4f}",
        str(sum(r.reused for r in rows)),
    )
    for name, total in zip(
        ("CALLS", "IMAGES", "CHARACTERS", "AUDIO S", "COST USD", "REUSED"), sums, strict=True
    ):
        table.add_column(name, justify="right", footer=total)
    for r in rows:
        table.add_row(
            r.day,
            escape(r.tenant),
            r.provider,
            escape(r.model),
            str(r.calls),
            str(r.images),
            str(r.speech_characters),
            f"{r.audio_seconds:.1f}",
            f"{r.cost_usd:.4f}",
            str(r.reused),
        )
    return table


def budgets_table(budgets: list[task_service_pb2.BudgetStatus]) -> Table:
    """``charai usage``: the tenant's budgets and what the current period used of each."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("BUDGET", "LIMIT", "SPENT", "STATE", "PERIOD ENDS"):
        table.add_column(name, justify="right" if name in ("LIMIT", "SPENT") else "left")
    for b in budgets:
        amount = "{:.2f}" if b.unit == "usd" else "{:.1f}" if b.unit == "audio_seconds" else "{:.0f}"
        state = "[red]reached[/]" if b.reached else "ok"
        table.add_row(
            f"{b.period}/{b.unit}",
            amount.format(b.limit),
            amount.format(b.spent),
            state,
            when(b.period_end_time),
        )
    return table


def print_task(out: Output, task: task_pb2.Task) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    status = status_label(task.status)
    style = STATUS_STYLE.get(status, "")
    rows: list[tuple[str, str]] = [
        ("id", task.id),
        ("type", type_name(task)),
        ("status", f"[{style}]{status}[/]" if style else status),
        ("progress", f"{task.progress}% {escape(task.stage)}"),
        ("priority", priority_label(task.priority)),
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
    if task.HasField("estimated_start_time"):
        rows.append(("expected start", when(task.estimated_start_time)))
    if task.HasField("estimated_end_time"):
        rows.append(("expected end", when(task.estimated_end_time)))
    url = media_url(task)
    if url:
        rows.append(("url", escape(url)))
    result = task.image_result if task.HasField("image_result") else task.tts_result
    if result.reused:
        rows.append(("reused from", escape(result.reused_from_task_id)))
    if task.HasField("usage"):
        rows.append(("usage", usage_text(task.usage)))
    if task.error.code:
        rows.append(("error", f"[red]{escape(failure_text(task))}[/]"))
    for label, value in rows:
        grid.add_row(label, value)
    out.render(grid)
