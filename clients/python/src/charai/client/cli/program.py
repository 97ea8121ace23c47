"""Running one command: connect, apply ``--timeout``, turn every failure into a message and an
exit code. ``main`` is the ``charai`` console script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import grpc
from charai.client.cli.commands import Session
from charai.client.cli.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_NOT_FINISHED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    GRPC_EXIT,
    CliError,
)
from charai.client.cli.output import Output
from charai.client.cli.parser import parse_args
from charai.client.client import CharaiClient, CharaiError, WatchResumeError


async def run(args: argparse.Namespace, out: Output, session_box: list[Session]) -> int:
    timeout: float | None = args.timeout
    if timeout is not None and not timeout > 0:  # NaN too
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
        code = GRPC_EXIT.get(exc.code, EXIT_ERROR)
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
