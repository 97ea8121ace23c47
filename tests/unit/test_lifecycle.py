"""The event loop every service runs on (CHARAI_EVENT_LOOP)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from charai.core import lifecycle


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARAI_EVENT_LOOP", raising=False)
    assert issubclass(lifecycle.run(_loop_type()), uvloop.Loop)


def test_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARAI_EVENT_LOOP", "asyncio")
    loop_type = lifecycle.run(_loop_type())
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_an_unknown_loop_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARAI_EVENT_LOOP", "trio")
    coro = _loop_type()
    with pytest.raises(SystemExit, match="CHARAI_EVENT_LOOP"):
        lifecycle.run(coro)
    coro.close()
