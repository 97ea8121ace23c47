"""The ``google.rpc`` details of a failed call, decoded once for every caller.

charai's servers attach a ``google.rpc.Status`` to a refusal (``grpc-status-details-bin``):
``BadRequest`` naming each bad field, ``ErrorInfo`` with a machine-readable reason, ``RetryInfo``
when waiting helps (see ``charai.core.grpcsupport``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

_BAD_REQUEST = error_details_pb2.BadRequest
_ERROR_INFO = error_details_pb2.ErrorInfo
_RETRY_INFO = error_details_pb2.RetryInfo


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a refusal said beyond its code and message; empty when it said nothing more."""

    #: ``(field, description)`` of each BadRequest violation, fields named as in the proto
    #: (``image.prompt``, ``metadata[characterId]``).
    field_violations: tuple[tuple[str, str], ...] = ()
    #: ErrorInfo's reason (``LIMIT_EXCEEDED``) and metadata (``{"limit": ...}``).
    reason: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: RetryInfo's delay in seconds; None without a RetryInfo.
    retry_after: float | None = None


def status_details(status: Any) -> ErrorDetails:
    """The details packed in a ``google.rpc.Status`` (or none, for ``None``)."""
    if status is None:
        return ErrorDetails()
    violations: list[tuple[str, str]] = []
    reason = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(_BAD_REQUEST.DESCRIPTOR):
            bad = _BAD_REQUEST()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(_ERROR_INFO.DESCRIPTOR):
            info = _ERROR_INFO()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(_RETRY_INFO.DESCRIPTOR):
            retry = _RETRY_INFO()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(tuple(violations), reason, metadata, retry_after)


def error_details(exc: grpc.aio.AioRpcError) -> ErrorDetails:
    """The details of a failed call, from its trailing metadata.

    Raises ValueError when the packed status contradicts the call's own code or message
    (``grpc_status.rpc_status.from_call``)."""
    return status_details(rpc_status.from_call(exc))
