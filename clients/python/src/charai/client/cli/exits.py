"""Exit codes: how a command (and the task it followed) ended, for scripts."""

from __future__ import annotations

import grpc
from charai.tasks.v1 import task_pb2

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

GRPC_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_UNAUTHENTICATED,
}
STATUS_EXIT = {
    task_pb2.TASK_STATUS_COMPLETED: EXIT_OK,
    task_pb2.TASK_STATUS_FAILED: EXIT_FAILED,
    task_pb2.TASK_STATUS_CANCELLED: EXIT_CANCELLED,
}


class CliError(Exception):
    """A problem the CLI reports itself (not a gRPC status): a message and the exit code to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
