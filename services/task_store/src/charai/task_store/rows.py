"""Between stored tasks and the lifecycle core: load a task row, read its lifecycle state, write
a decided state back onto the task message.

The ``tasks`` table keeps the task message (``task``, a serialized ``charai.tasks.v1.Task``) next
to the columns that queries and fencing use. Lifecycle decisions are made from both
(:func:`state_of`); a decided state goes back onto the message (:func:`write_state`) before the
unit of work saves it with its event.
"""

from __future__ import annotations

from typing import NamedTuple

from charai.core.domain.errors import ErrorKind
from charai.core.domain.lifecycle import Failure, TaskState
from charai.core.domain.states import Status
from charai.core.errors import NotFoundError
from charai.core.timestamps import micros, set_micros
from charai.task_store.backend import Tx
from charai.tasks.v1 import task_pb2

TASK_COLUMNS = (
    "task, tenant, attempt, lease_expires, dispatch_gen, last_seq, next_attempt_time, status, lease_owner,"
    " held, reuse_key"
)


class TaskRow(NamedTuple):
    """The columns of ``tasks`` that decisions are made from (:data:`TASK_COLUMNS`, in order)."""

    task: bytes
    tenant: str
    attempt: int
    lease_expires: int | None
    dispatch_gen: int
    last_seq: int
    next_attempt_time: int | None
    status: int
    lease_owner: str | None
    #: Waiting in the fair backlog (no job of it is meant to be out: see ``Backlog``).
    held: int
    #: The key identical requests share (``charai.task_store.reuse``); None: takes no part.
    reuse_key: str | None


async def load(
    tx: Tx, for_update: str, task_id: str, tenant: str | None = None
) -> tuple[task_pb2.Task, TaskRow]:
    """The task and its row; ``for_update``: the dialect's row-lock suffix when the transaction
    is about to change the task ("" for a read). Another tenant's task is not found."""
    raw = await tx.fetchrow(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?{for_update}", task_id)
    if raw is None:
        raise NotFoundError(f"task {task_id} not found", id=task_id)
    row = TaskRow(*raw)
    if tenant is not None and row.tenant != tenant:
        raise NotFoundError(f"task {task_id} not found", id=task_id)
    return task_pb2.Task.FromString(row.task), row


def failure_of(error: task_pb2.TaskError) -> Failure:
    """A ``TaskError`` as the core sees it (an unknown code counts as INTERNAL)."""
    code = int(error.code)
    kind = ErrorKind(code) if code in ErrorKind._value2member_map_ else ErrorKind.INTERNAL
    return Failure(kind, error.message, error.retryable, error.provider_status, error.provider_code)


def state_of(task: task_pb2.Task, row: TaskRow) -> TaskState:
    return TaskState(
        status=Status(task.status),
        max_attempts=task.max_attempts,
        attempt=task.attempt,
        progress=task.progress,
        stage=task.stage,
        dispatch_gen=int(row.dispatch_gen),
        lease_expires=row.lease_expires,
        lease_owner=row.lease_owner,
        next_attempt_time=row.next_attempt_time,
        start_time=micros(task.start_time) if task.HasField("start_time") else None,
        end_time=micros(task.end_time) if task.HasField("end_time") else None,
        error=failure_of(task.error) if task.HasField("error") else None,
    )


def _set_time(task: task_pb2.Task, field: str, value: int | None) -> None:
    if value is None:
        task.ClearField(field)  # type: ignore[arg-type]
    else:
        set_micros(getattr(task, field), value)


def write_state(task: task_pb2.Task, state: TaskState) -> None:
    """Puts a decided state onto the task message (in place)."""
    task.status = int(state.status)  # type: ignore[assignment]
    task.attempt = state.attempt
    task.max_attempts = state.max_attempts
    task.progress = state.progress
    task.stage = state.stage
    _set_time(task, "next_attempt_time", state.next_attempt_time)
    _set_time(task, "start_time", state.start_time)
    _set_time(task, "end_time", state.end_time)
    if state.error is None:
        task.ClearField("error")
        return
    e = state.error
    task.error.CopyFrom(
        task_pb2.TaskError(
            code=int(e.kind),  # type: ignore[arg-type]
            message=e.message,
            retryable=e.retryable,
            provider_status=e.provider_status,
            provider_code=e.provider_code,
        )
    )
