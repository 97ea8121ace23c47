"""Keys generated into the data dir (``charai.core.keys``): on the real file system, with real
processes racing for the file."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest
from charai.core.keys import generated, keys


def _generate(path: str, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue[bytes]) -> None:
    start.wait()
    out.put(generated(Path(path)))


def test_processes_generating_one_key_at_once_all_get_the_same_whole_key(tmp_path: Path) -> None:
    # The file was created empty and then written: a process that lost the race read it in
    # between and signed media URLs with b"" (85 of 200 trials of two processes).
    ctx = multiprocessing.get_context("fork")
    for trial in range(20):
        path = tmp_path / f"k{trial}" / "media-signing.key"
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_generate, args=(str(path), start, out)) for _ in range(4)]
        for proc in procs:
            proc.start()
        start.set()
        found = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
        assert len(set(found)) == 1 and len(found[0]) >= 32, found
        assert found[0] == path.read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["media-signing.key"]  # no draft left


def test_an_empty_key_file_is_refused_and_a_setting_wins(tmp_path: Path) -> None:
    (tmp_path / "media-signing.key").write_text("")
    with pytest.raises(SystemExit, match="empty"):
        keys("", tmp_path, "media-signing.key")
    assert keys(" new , old ", tmp_path, "media-signing.key") == [b"new", b"old"]
