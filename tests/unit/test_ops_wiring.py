"""The shared operations parts every composition root wires: the health watcher (gateway,
task_store) and the metrics endpoint (task_store, workers). Time is a ManualClock: nothing sleeps."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
from typing import Any

import pytest
from charai.core.clock import ManualClock
from charai.core.health import HealthWatcher
from charai.core.metrics import Metrics
from charai.core.metrics_endpoint import MetricsEndpoint
from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeHealth:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def set(self, service: str, status: Any) -> None:
        self.calls.append((service, status))


async def settle() -> None:
    """Lets woken tasks run to their next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_health_follows_the_probe_on_the_clock() -> None:
    clock = ManualClock()
    health = FakeHealth()
    up = True
    probes = 0

    async def probe() -> bool:
        nonlocal probes
        probes += 1
        return up

    async with HealthWatcher(health, ["svc.A"], probe, interval=1.0, clock=clock) as watcher:
        await settle()
        assert (probes, health.calls) == (0, [])  # nothing before the first interval
        clock.advance(1.0)
        await settle()
        assert probes == 1 and health.calls == []  # still serving: nothing to set
        up = False
        clock.advance(1.0)
        await settle()
        assert health.calls == [("svc.A", NOT_SERVING), ("", NOT_SERVING)] and not watcher.serving
        clock.advance(1.0)
        await settle()
        assert len(health.calls) == 2  # set only when the verdict changes
        up = True
        clock.advance(1.0)
        await settle()
        assert health.calls[2:] == [("svc.A", SERVING), ("", SERVING)] and watcher.serving
        assert probes == 4
    assert clock.sleepers == 0  # closed: its loop is gone
    await watcher.close()  # idempotent


async def test_a_failing_or_hanging_probe_means_not_serving() -> None:
    health = FakeHealth()

    async def broken() -> bool:
        raise ConnectionError("database away")

    async def hanging() -> bool:
        await asyncio.Event().wait()
        return True

    assert await HealthWatcher(health, ["s"], broken).check() is False
    assert await HealthWatcher(health, ["s"], hanging, probe_timeout=0.01).check() is False
    assert health.calls == [("s", NOT_SERVING), ("", NOT_SERVING)] * 2


async def test_metrics_endpoint_serves_live_and_refreshed_gauges() -> None:
    clock = ManualClock()
    metrics = Metrics("test")
    in_flight = [3]
    depth = iter([5.0, 7.0])
    refreshes = 0

    async def refresh() -> None:
        nonlocal refreshes
        refreshes += 1
        metrics.outbox_backlog.set(next(depth))

    endpoint = MetricsEndpoint(
        metrics,
        "127.0.0.1:0",
        live=[(metrics.jobs_in_flight.labels("image"), lambda: in_flight[0])],
        refresh=refresh,
        refresh_every=5.0,
        clock=clock,
    )
    async with endpoint:
        await settle()
        assert endpoint.port > 0

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as resp:
                return str(resp.read().decode())

        text = await asyncio.to_thread(scrape)
        assert 'charai_worker_jobs_in_flight{kind="image"} 3.0' in text
        assert "charai_outbox_backlog 5.0" in text and refreshes == 1
        in_flight[0] = 4
        clock.advance(5.0)
        await settle()
        text = await asyncio.to_thread(scrape)
        assert 'charai_worker_jobs_in_flight{kind="image"} 4.0' in text
        assert "charai_outbox_backlog 7.0" in text and refreshes == 2
        port = endpoint.port
    assert endpoint.port == 0 and clock.sleepers == 0
    await endpoint.close()  # idempotent
    with pytest.raises(OSError):
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)


async def test_without_an_address_only_live_gauges_are_wired() -> None:
    metrics = Metrics("test")
    refreshed = False

    async def refresh() -> None:
        nonlocal refreshed
        refreshed = True

    async with MetricsEndpoint(
        metrics, "", live=[(metrics.watch_streams, lambda: 9)], refresh=refresh
    ) as endpoint:
        await settle()
        assert endpoint.port == 0 and not refreshed  # no database queries nobody scrapes
        assert b"charai_watch_streams_open 9.0" in metrics.render()


async def test_a_taken_metrics_address_names_the_setting() -> None:
    metrics = Metrics("test")
    async with MetricsEndpoint(metrics, "127.0.0.1:0") as first:
        with pytest.raises(SystemExit, match="CHARAI_METRICS_ADDR"):
            MetricsEndpoint(Metrics("other"), f"127.0.0.1:{first.port}").start()


def _gc_samples(metrics: Metrics) -> dict[str, float]:
    lines = metrics.render().decode().splitlines()
    pairs = (line.rsplit(" ", 1) for line in lines if line.startswith("charai_gc_pause_seconds"))
    return {name: float(value) for name, value in pairs}


def test_every_collection_shows_as_a_pause_of_its_generation() -> None:
    metrics = Metrics("test")
    before = _gc_samples(metrics)
    gc.collect()
    gc.collect()
    after = _gc_samples(metrics)
    full = 'charai_gc_pause_seconds_count{generation="2"}'
    assert after[full] >= before[full] + 2
    assert (
        after['charai_gc_pause_seconds_sum{generation="2"}']
        > before['charai_gc_pause_seconds_sum{generation="2"}']
    )
    assert after['charai_gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == after[full]
    assert Metrics("other").render().count(b"# TYPE charai_gc_pause_seconds histogram") == 1


def test_rpc_and_exchange_observations_count_per_label_set() -> None:
    # observe_rpc and exchange_size keep each label set's child after its first use: every
    # later call must still land on its own (method, code) and kind, never on an earlier one's.
    metrics = Metrics("test")
    for method, code, seconds in (
        ("/s.S/Exchange", "OK", 0.002),
        ("/s.S/Exchange", "OK", 0.004),
        ("/s.S/Exchange", "NOT_FOUND", 0.5),
        ("/s.S/GetTask", "OK", 0.001),
    ):
        metrics.observe_rpc(method, code, seconds)
    for kind, commands in (("progress", 3), ("create", 1), ("progress", 5)):
        metrics.exchange_size(kind, commands)
    value = metrics.registry.get_sample_value
    assert value("charai_rpc_requests_total", {"method": "Exchange", "code": "OK"}) == 2
    assert value("charai_rpc_requests_total", {"method": "Exchange", "code": "NOT_FOUND"}) == 1
    assert value("charai_rpc_requests_total", {"method": "GetTask", "code": "OK"}) == 1
    assert value("charai_rpc_duration_seconds_count", {"method": "Exchange"}) == 3
    assert value("charai_rpc_duration_seconds_sum", {"method": "Exchange"}) == pytest.approx(0.506)
    assert value("charai_exchange_commands_sum", {"kind": "progress"}) == 8
    assert value("charai_exchange_commands_count", {"kind": "progress"}) == 2
    assert value("charai_exchange_commands_count", {"kind": "create"}) == 1
