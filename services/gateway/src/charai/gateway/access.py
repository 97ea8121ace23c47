"""What the caller of the current RPC may do: a tenant key may do everything its tenant may; an
access token (:mod:`charai.gateway.tokens`) only what its scope allows.

The authenticator puts the verified token in :data:`current` (None for a tenant key); the
servicer asks the functions below before it forwards a call. Refusals follow the contract:
``PERMISSION_DENIED`` for a call outside the scope, ``NOT_FOUND`` for a task outside it (a token
must not tell which task ids exist), and a list or watch filter is narrowed to the scope, never
widened.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

from charai.core import validation
from charai.core.errors import NotFoundError, PermissionDeniedError
from charai.gateway.tokens import AccessToken, Scope
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2, task_service_pb2

#: The access token of the current RPC; None when it came with a tenant API key.
current: contextvars.ContextVar[AccessToken | None] = contextvars.ContextVar("access_token", default=None)


class OutOfScopeError(PermissionDeniedError):
    """A call an access token may not make (ErrorInfo reason ``ACCESS_TOKEN_SCOPE``)."""

    reason = "ACCESS_TOKEN_SCOPE"


def scope() -> Scope | None:
    token = current.get()
    return None if token is None else token.scope


def create_scope() -> spb.CreateScope | None:
    """The reach task_store checks an earlier task against when a create's ``request_id`` names
    one (None for a tenant key): a token must not read another task by replaying its id."""
    granted = scope()
    if granted is None:
        return None
    return spb.CreateScope(metadata=granted.pairs, task_ids=sorted(granted.task_ids))


def require_tenant_key(what: str) -> None:
    """Refuses a call that only a tenant key may make (``what``: e.g. "GetQueueStats")."""
    if current.get() is not None:
        raise OutOfScopeError(
            f"{what} needs the tenant's API key; an access token cannot call it", method=what
        )


def check_task(task: task_pb2.Task) -> task_pb2.Task:
    """The task, if the caller may see it; NOT_FOUND otherwise (no existence leak)."""
    granted = scope()
    if granted is not None and not granted.reaches(task.id, task.metadata):
        raise NotFoundError(f"task {task.id} not found", id=task.id)
    return task


def check_create(request: task_service_pb2.CreateTaskRequest) -> None:
    """Refuses a create outside the token's scope: its metadata as the gateway fills it must
    hold the scope's pairs, and each id its payload and callback give
    (:func:`~charai.core.validation.payload_identity`) must agree with the scope's value for
    its key: a char_001 token must not create a task whose payload or callback names char_002,
    however its metadata reads. Nothing to compute for a tenant key."""
    granted = scope()
    if granted is None:
        return
    if granted.may_create(validation.fill_metadata(request)):
        pairs = granted.pairs
        for key, value, field in validation.payload_identity(request):
            if key in pairs and value != pairs[key]:
                raise OutOfScopeError(
                    f"this access token may only create tasks with {key}={pairs[key]}; {field} names another"
                )
        return
    if not granted.allow_create:
        raise OutOfScopeError("this access token may not create tasks (ask for one with allow_create)")
    wanted = ", ".join(f"{k}={v}" for k, v in granted.metadata) or "a metadata scope"
    raise OutOfScopeError(f"this access token may only create tasks with {wanted} in their metadata")


def narrow(metadata: Mapping[str, str]) -> dict[str, str]:
    """A list or watch filter within the caller's scope: the token's metadata pairs added to the
    client's. A filter that contradicts the scope (another value for one of its keys) asks for
    tasks outside it: refused, never widened."""
    wanted = dict(metadata)
    granted = scope()
    if granted is None:
        return wanted
    for key, value in granted.metadata:
        if wanted.setdefault(key, value) != value:
            raise OutOfScopeError(
                f"the filter asks for {key}={wanted[key]}, outside this access token's scope ({key}={value})"
            )
    return wanted


def id_scope() -> frozenset[str] | None:
    """For a token with task ids but no metadata scope: the only task ids it reaches (lists and
    multi-task watches are then limited to them); None otherwise."""
    granted = scope()
    if granted is None or granted.metadata:
        return None
    return granted.task_ids
