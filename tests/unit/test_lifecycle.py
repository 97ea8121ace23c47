"""The event loop every service runs on (CHARAI_EVENT_LOOP) and its garbage collector's tuning
(CHARAI_GC_THRESHOLD): settings each ``__main__`` passes to ``lifecycle.run``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest
import uvloop
from charai.core import lifecycle, settings
from charai.core.settings import CommonSettings
from structlog.testing import capture_logs


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARAI_EVENT_LOOP", raising=False)
    config = settings.load(CommonSettings)
    assert config.event_loop == "uvloop"
    assert issubclass(lifecycle.run(_loop_type(), config.event_loop), uvloop.Loop)
    assert issubclass(lifecycle.run(_loop_type()), uvloop.Loop)


def test_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARAI_EVENT_LOOP", " AsyncIO ")
    config = settings.load(CommonSettings)
    assert config.event_loop == "asyncio"
    loop_type = lifecycle.run(_loop_type(), config.event_loop)
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def _refused(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    cls: type[CommonSettings] = CommonSettings,
) -> str:
    """Loading the settings (``cls``) with ``name=value`` exits with status 2; returns what it
    printed."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        settings.load(cls)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_an_unknown_loop_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "CHARAI_EVENT_LOOP='trio'" in _refused(monkeypatch, capsys, "CHARAI_EVENT_LOOP", "trio")
    coro = _loop_type()
    with pytest.raises(ValueError, match="event_loop"):
        lifecycle.run(coro, "trio")  # type: ignore[arg-type]


@contextlib.contextmanager
def _gc_restored() -> Iterator[None]:
    """The test process's own collector settings come back afterwards."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def _gc_state() -> tuple[tuple[int, int, int], int]:
    return gc.get_threshold(), gc.get_freeze_count()


def test_a_service_freezes_what_it_started_with_and_collects_young_objects_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CHARAI_GC_THRESHOLD", raising=False)
    config = settings.load(CommonSettings)
    assert config.gc_threshold == 10_000
    with _gc_restored():
        gc.unfreeze()
        threshold, frozen = lifecycle.run(_gc_state(), config.event_loop, config.gc_threshold)
        assert threshold == (10_000, 10, 10)
        assert frozen > 1_000  # the imported modules at least


def test_a_zero_threshold_leaves_the_interpreters_collector_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARAI_GC_THRESHOLD", "0")
    config = settings.load(CommonSettings)
    with _gc_restored():
        gc.unfreeze()
        before = gc.get_threshold()
        assert lifecycle.run(_gc_state(), config.event_loop, config.gc_threshold) == (before, 0)


def test_a_negative_threshold_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "CHARAI_GC_THRESHOLD" in _refused(monkeypatch, capsys, "CHARAI_GC_THRESHOLD", "-5")


class _Parts(lifecycle.ServiceApp):
    """An app of three parts that records what opened and closed; ``fail_at``: the part whose
    opening raises."""

    stopped = "parts_stopped"

    def __init__(self, fail_at: str = "") -> None:
        super().__init__()
        self.fail_at = fail_at
        self.trail: list[str] = []

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        for part in ("nats", "store", "server"):
            if part == self.fail_at:
                raise RuntimeError(f"{part} would not open")
            self.trail.append(f"open {part}")
            stack.callback(self.trail.append, f"close {part}")


async def test_a_service_app_closes_its_parts_in_reverse_order_once() -> None:
    with capture_logs() as lines:
        async with _Parts() as app:
            assert app.trail == ["open nats", "open store", "open server"]
        await app.close()  # again: nothing more
    assert app.trail[3:] == ["close server", "close store", "close nats"]
    assert [line["event"] for line in lines].count("parts_stopped") == 1


async def test_a_service_app_that_fails_to_start_closes_only_what_it_opened() -> None:
    app = _Parts(fail_at="server")
    with pytest.raises(RuntimeError, match="server would not open"):
        await app.start()
    assert app.trail == ["open nats", "open store", "close store", "close nats"]
    await app.close()
    assert len(app.trail) == 4
