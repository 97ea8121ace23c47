"""Errors that cross the gRPC boundary. Each class declares its status code and AIP-193 reason;
the translation to ``google.rpc.Status`` happens in one place (:mod:`charai.core.grpcsupport`)."""

from __future__ import annotations

import grpc

DOMAIN = "tasks.charai"


class CharaiError(Exception):
    """Base of errors a client may see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class NotFoundError(CharaiError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"


class StaleAttemptError(CharaiError):
    """A report from an attempt that no longer holds the task (fencing)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "STALE_ATTEMPT"


class TaskEndedError(CharaiError):
    """A report for a task that already reached its terminal state (e.g. cancelled)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_ENDED"


class NotFailedError(CharaiError):
    """RetryTask on a task that is not FAILED (only failed tasks are re-run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_NOT_FAILED"


class TaskNotFinishedError(CharaiError):
    """DeleteTask on a task that is still queued or running (cancel it first)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_NOT_FINISHED"


class LimitExceededError(CharaiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"


class UnauthenticatedError(CharaiError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(CharaiError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class UnavailableError(CharaiError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
