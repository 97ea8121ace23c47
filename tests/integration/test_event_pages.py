"""The gateway's reading of the event log (``charai.gateway.follow.read_log``) against a real
task_store over gRPC: pages that stop at ``ListEventsRequest.max_bytes`` are read on until the
store says nothing more follows, so a watch's catch-up misses nothing however large the tasks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from charai.core.storeclient import StoreClient
from charai.gateway import follow
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.app import TaskStoreApp
from charai.task_store.settings import Settings

from tests.integration.store_requests import image_request

if TYPE_CHECKING:
    from tests.conftest import NatsServer


async def test_read_log_reads_on_past_pages_cut_by_size(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'tasks.db'}",
        shutdown_grace_seconds=1.0,
    )
    async with (
        TaskStoreApp(settings, listen_addr="127.0.0.1:0") as app,
        StoreClient(f"127.0.0.1:{app.port}") as client,
    ):
        for n in range(12):  # 12 QUEUED events of about 16 KB each
            await client.create_task("t1", image_request(prompt="\U0001f5e1" * 3990 + f"{n:010d}"))
        whole = await client.list_events(spb.ListEventsRequest(tenant="t1", limit=5000))
        calls = 0
        list_events = client.list_events

        async def counted(request: spb.ListEventsRequest, **kwargs: Any) -> spb.ListEventsResponse:
            nonlocal calls
            calls += 1
            return await list_events(request, **kwargs)

        monkeypatch.setattr(client, "list_events", counted)
        monkeypatch.setattr(follow, "LOG_PAGE_BYTES", 50_000)
        events, head = await follow.read_log(client, spb.ListEventsRequest(tenant="t1"))
    assert [e.sequence for e in events] == [e.sequence for e in whole.events]
    assert len(events) == 12 and head == whole.head_sequence
    assert calls >= 4, calls  # the pages were cut, and read on
