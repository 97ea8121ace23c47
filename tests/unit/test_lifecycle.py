"""The event loop every service runs on (CHARAI_EVENT_LOOP, a setting each ``__main__`` passes)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from charai.core import lifecycle, settings
from charai.core.settings import CommonSettings


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


def test_an_unknown_loop_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHARAI_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit) as stopped:
        settings.load(CommonSettings)
    assert stopped.value.code == 2
    assert "CHARAI_EVENT_LOOP='trio'" in capsys.readouterr().err
    coro = _loop_type()
    with pytest.raises(ValueError, match="event_loop"):
        lifecycle.run(coro, "trio")  # type: ignore[arg-type]
