"""``make run`` and ``make demo`` as a user runs them: real processes, signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
from pathlib import Path

from tests.conftest import later_port


async def test_run_starts_everything_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    grpc_port, http_port, store_port = later_port(), later_port(), later_port()
    env.update(
        CHARAI_DATA_DIR=str(tmp_path / "data"),
        CHARAI_GATEWAY_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        CHARAI_GATEWAY_HTTP_ADDR=f"127.0.0.1:{http_port}",
        CHARAI_TASK_STORE_ADDR=f"127.0.0.1:{store_port}",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "charai.devstack", "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "make run exited early:\n" + "".join(seen[-30:])
                seen.append(line)
                if "charai is running" in line:
                    break
        assert f"127.0.0.1:{grpc_port}" in line
        # Every service logs with its name, so a person can tell the lines apart.
        prefixes = {s.split("]")[0].strip("[ ") for s in seen if s.startswith("[")}
        assert {"nats", "emulator", "task_store", "gateway", "image_worker", "tts_worker"} <= prefixes
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(40):
            rest = (await proc.stdout.read()).decode()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, rest[-3000:]
    for name in ("gateway_stopped", "task_store_stopped", "worker_stopped"):
        assert name in rest
    # The ports are free again: nothing was left running.
    for port in (grpc_port, http_port, store_port):
        reader_writer = None
        with contextlib.suppress(OSError):
            reader_writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader_writer is None, f"port {port} still open after SIGTERM"


async def test_demo_generates_an_image_and_a_voice(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "charai.devstack", "demo", "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    async with asyncio.timeout(120):
        output, _ = await proc.communicate()
    text = output.decode()
    assert proc.returncode == 0, text[-3000:]
    png = (out / "char_001-front.png").read_bytes()
    wav = (out / "char_001-voice.wav").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", png[16:24]) == (1024, 1024)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    assert "100%" in text
    assert str(out) in text.replace("\n", "")
