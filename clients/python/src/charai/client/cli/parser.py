"""The argument parser: every command, its options, and the help text with the exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from charai.client.cli.commands import (
    cmd_batch,
    cmd_cancel,
    cmd_download,
    cmd_get,
    cmd_image,
    cmd_list,
    cmd_retry,
    cmd_stats,
    cmd_tts,
    cmd_usage,
    cmd_watch,
    cmd_webhook_list,
    cmd_webhook_redeliver,
    cmd_webhook_secret,
)
from charai.client.cli.exits import EXIT_CODES, EXIT_INVALID
from charai.client.cli.text import TYPES
from charai.taskapi import PRIORITIES, STATUSES

DEFAULT_TARGET = "127.0.0.1:50051"


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
    p.add_argument("--priority", choices=list(PRIORITIES), default="normal")
    p.add_argument(
        "--request-id", default="", metavar="R", help="idempotency key: a retry returns the same task"
    )
    p.add_argument(
        "--no-follow", action="store_true", help="print the task id (--json: the task) and return at once"
    )
    p.add_argument("--webhook", default="", metavar="URL", help="POST the task's events here (signed)")
    p.add_argument(
        "--webhook-events",
        action="extend",
        nargs="+",
        metavar="EVENT",
        help="started, progress, completed, failed, cancelled (default: the last three)",
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
    image.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="an identical request with this seed reuses the image",
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
    tts.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        default=None,
        help="call the provider even if an identical request's audio could be reused",
    )
    _submit_options(tts)
    tts.set_defaults(run=cmd_tts)


def _list_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    listing = command("list", "list tasks, newest first")
    listing.add_argument("--character", metavar="ID", help="metadata.characterId")
    listing.add_argument("--category", metavar="C", help="metadata.category")
    listing.add_argument(
        "--metadata", action="extend", nargs="+", metavar="K=V", help="more metadata filters"
    )
    listing.add_argument("--type", choices=list(TYPES))
    listing.add_argument("--status", choices=list(STATUSES))
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most N tasks (default 50)")
    listing.set_defaults(run=cmd_list)


def _id_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``get``, ``cancel`` and ``retry``: one task, by id."""
    get = command("get", "show one task")
    get.add_argument("id", metavar="ID")
    get.set_defaults(run=cmd_get)

    cancel = command("cancel", "cancel a queued or running task")
    cancel.add_argument("id", metavar="ID")
    cancel.set_defaults(run=cmd_cancel)
    retry = command("retry", "re-run a failed task (queued again with a fresh attempt budget)")
    retry.add_argument("id", metavar="ID")
    retry.set_defaults(run=cmd_retry)


def _webhook_commands(command: Callable[[str, str], argparse.ArgumentParser], common: Parser) -> None:
    """``webhooks secret|list|redeliver`` (a tenant API key, not an access token)."""
    hooks = command("webhooks", "webhook secret, deliveries and redelivery")
    sub = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="WHAT")
    secret = sub.add_parser("secret", help="print the signing secret", parents=[common])
    secret.add_argument(
        "--rotate", action="store_true", help="make a new one (the old one keeps signing a while)"
    )
    secret.set_defaults(run=cmd_webhook_secret)
    listing = sub.add_parser("list", help="deliveries, newest first, with their attempts", parents=[common])
    listing.add_argument("--task", metavar="ID")
    listing.add_argument("--url", metavar="URL")
    listing.add_argument("--status", choices=["pending", "delivered", "failed"])
    listing.add_argument("--limit", type=int, default=50, metavar="N")
    listing.set_defaults(run=cmd_webhook_list)
    again = sub.add_parser(
        "redeliver", help="send a delivery again, or every failed one --since", parents=[common]
    )
    again.add_argument("id", nargs="?", metavar="DELIVERY_ID")
    again.add_argument("--since", type=float, metavar="UNIX_SECONDS", help="every failed delivery since then")
    again.set_defaults(run=cmd_webhook_redeliver)


def _usage_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    usage = command("usage", "metered provider usage and cost by day, tenant, provider and model; budgets")
    whose = usage.add_mutually_exclusive_group()
    whose.add_argument("--tenant", metavar="NAME", help="another tenant's usage (operator tenants only)")
    whose.add_argument(
        "--all", dest="all_tenants", action="store_true", help="every tenant's usage (operator tenants only)"
    )
    usage.add_argument("--from", dest="start_day", metavar="YYYY-MM-DD", help="first day (default: the 1st)")
    usage.add_argument("--to", dest="end_day", metavar="YYYY-MM-DD", help="last day (default: today, UTC)")
    usage.set_defaults(run=cmd_usage)


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

    _list_command(command)
    _id_commands(command)
    stats = command("stats", "queue depth, running, throughput and median wait per lane (type x priority)")
    stats.set_defaults(run=cmd_stats)
    _usage_command(command)

    download = command("download", "save the image or audio of a completed task")
    download.add_argument("id", metavar="ID")
    download.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to save it ('-': stdout)"
    )
    download.set_defaults(run=cmd_download)
    batch = command("batch", "submit up to 100 tasks in one call, all or none (BatchCreateTasks)")
    batch.add_argument(
        "file", metavar="FILE", help='{"requests": [CreateTaskRequest, ...]} as proto3 JSON ("-": stdin)'
    )
    batch.set_defaults(run=cmd_batch)
    _webhook_commands(command, common)
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
