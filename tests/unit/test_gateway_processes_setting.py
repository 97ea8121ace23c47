"""``CHARAI_GATEWAY_PROCESSES``: parsed into a count of processes, a bad value named; where each
process serves ``/metrics``; SO_REUSEPORT only where asked for."""

from __future__ import annotations

import pytest
from charai.core import grpcsupport, settings
from charai.gateway.settings import Settings, cpu_cores


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHARAI_GATEWAY_PROCESSES", "CHARAI_METRICS_ADDR"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_by_default() -> None:
    assert settings.load(Settings).gateway_processes == 1


@pytest.mark.parametrize(("raw", "count"), [("2", 2), (" 8 ", 8), ("1", 1)])
def test_a_number_of_processes(monkeypatch: pytest.MonkeyPatch, raw: str, count: int) -> None:
    monkeypatch.setenv("CHARAI_GATEWAY_PROCESSES", raw)
    assert settings.load(Settings).gateway_processes == count


@pytest.mark.parametrize("raw", ["0", "00", "auto", " AUTO "])
def test_zero_or_auto_is_one_per_core(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CHARAI_GATEWAY_PROCESSES", raw)
    assert settings.load(Settings).gateway_processes == cpu_cores() >= 1


@pytest.mark.parametrize("raw", ["-1", "two", "1.5", "", "true", "257", "100000", "²"])
def test_a_bad_value_stops_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raw: str
) -> None:
    monkeypatch.setenv("CHARAI_GATEWAY_PROCESSES", raw)
    with pytest.raises(SystemExit) as stopped:
        settings.load(Settings)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"CHARAI_GATEWAY_PROCESSES={raw!r}" in err
    assert "0 / auto for one per CPU core" in err


def test_each_process_serves_metrics_on_the_port_plus_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARAI_GATEWAY_PROCESSES", "3")
    assert settings.load(Settings).metrics_addr_of(2) == ""  # unset: no port of its own
    monkeypatch.setenv("CHARAI_METRICS_ADDR", "127.0.0.1:9100")
    config = settings.load(Settings)
    assert [config.metrics_addr_of(i) for i in (None, 0, 1, 2)] == [
        "127.0.0.1:9100",
        "127.0.0.1:9100",
        "127.0.0.1:9101",
        "127.0.0.1:9102",
    ]
    monkeypatch.setenv("CHARAI_METRICS_ADDR", "127.0.0.1:0")
    assert settings.load(Settings).metrics_addr_of(2) == "127.0.0.1:0"  # each binds a free port


def test_metrics_ports_past_the_last_port_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHARAI_GATEWAY_PROCESSES", "4")
    monkeypatch.setenv("CHARAI_METRICS_ADDR", "127.0.0.1:65534")
    with pytest.raises(SystemExit):
        settings.load(Settings)
    err = capsys.readouterr().err
    assert "CHARAI_METRICS_ADDR" in err and "CHARAI_GATEWAY_PROCESSES" in err


def test_so_reuseport_is_on_only_when_asked_for() -> None:
    assert ("grpc.so_reuseport", 0) in grpcsupport.SERVER_OPTIONS
    assert ("grpc.so_reuseport", 0) in grpcsupport.server_options()
    shared = grpcsupport.server_options(reuse_port=True)
    assert ("grpc.so_reuseport", 1) in shared
    assert len(shared) == len(grpcsupport.SERVER_OPTIONS)
