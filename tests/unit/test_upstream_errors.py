"""What the gateway answers when a call to task_store failed (``grpcsupport._upstream_status``),
and what egress makes of a URL urllib cannot read (``egress.vet_url``): pure, no I/O."""

from __future__ import annotations

import grpc
import pytest
from charai.core import grpcsupport
from charai.worker.egress import EgressRefusedError, vet_url
from google.rpc import code_pb2, status_pb2


def failed(code: grpc.StatusCode, details: str, status: status_pb2.Status | None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if status is not None:
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def test_a_refusal_passes_through_with_its_details() -> None:
    rich = status_pb2.Status(code=code_pb2.NOT_FOUND, message="task task_x not found")
    assert grpcsupport._upstream_status(failed(grpc.StatusCode.NOT_FOUND, rich.message, rich)) == rich


def test_details_of_another_code_leave_the_calls_code_and_a_bounded_message() -> None:
    # task_store's NOT_FOUND whose answer grew past the metadata limit: the call failed
    # RESOURCE_EXHAUSTED with NOT_FOUND's details, and from_call raised ValueError (UNKNOWN).
    rich = status_pb2.Status(code=code_pb2.NOT_FOUND, message="webhook delivery " + "x" * 5000)
    status = grpcsupport._upstream_status(failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "y" * 5000, rich))
    assert status.code == code_pb2.RESOURCE_EXHAUSTED and len(status.message) == 1000


def test_anything_else_is_unavailable_without_the_internal_details() -> None:
    status = grpcsupport._upstream_status(failed(grpc.StatusCode.UNKNOWN, "OverflowError: secret", None))
    assert status.code == code_pb2.UNAVAILABLE and "secret" not in status.message


@pytest.mark.parametrize("url", ["http://[::1", "http://[zz]/x", "https://[::1/x"])
async def test_a_url_urllib_cannot_read_is_refused_not_raised(url: str) -> None:
    async def resolve(host: str, port: int) -> list[str]:  # pragma: no cover - never asked
        raise AssertionError(host)

    with pytest.raises(EgressRefusedError) as refused:
        await vet_url(url, allow_private=True, resolve=resolve)
    assert not refused.value.unresolved
