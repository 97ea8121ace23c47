"""``make demo``: the whole stack, one character image and one character voice, live progress."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
import wave
from io import BytesIO
from pathlib import Path

from charai.client import CharaiClient
from charai.devstack.stack import Stack
from charai.taskapi import status_label
from charai.tasks.v1 import task_pb2
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

CHARACTER = {"id": "char_001", "name": "Li Ming"}


async def follow(client: CharaiClient, task: task_pb2.Task, progress: Progress, bar: TaskID) -> task_pb2.Task:
    last = task
    async for event in client.watch(task.id):
        last = event.task
        status = status_label(last.status)
        progress.update(bar, completed=last.progress, stage=f"{status}: {last.stage}")
    return last


@dataclasses.dataclass(frozen=True)
class _Generated:
    """The two completed tasks and the media they point to."""

    image: task_pb2.Task
    voice: task_pb2.Task
    png: bytes
    wav: bytes


async def _submit(client: CharaiClient) -> tuple[task_pb2.Task, task_pb2.Task]:
    """One character image and one character voice, as the app would ask for them."""
    image = await client.create_image(
        CHARACTER["id"],
        "full-body character sheet of Li Ming, a young swordsman in blue robes, front view",
        character_name=CHARACTER["name"],
        resolution="1024x1024",
        view_type="front",
        metadata={"category": "character_design"},
    )
    voice = await client.create_tts(
        CHARACTER["id"],
        "你好，我是李明。Hello, I am Li Ming, and this is my voice.",
        character_name=CHARACTER["name"],
        voice_style="tongtong",
        response_format="wav",
        metadata={"category": "character_voice"},
    )
    return image, voice


async def _follow_both(
    client: CharaiClient, console: Console, image: task_pb2.Task, voice: task_pb2.Task
) -> tuple[task_pb2.Task, task_pb2.Task]:
    """Both tasks' live progress as two bars, until each ends; their final states."""
    columns = (
        TextColumn("{task.description:<6}"),
        BarColumn(bar_width=40),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bars = [
            progress.add_task("image", total=100, stage="queued"),
            progress.add_task("voice", total=100, stage="queued"),
        ]
        return await asyncio.gather(
            follow(client, image, progress, bars[0]), follow(client, voice, progress, bars[1])
        )


async def _generate(client: CharaiClient, console: Console) -> _Generated | None:
    """Submit, follow and download both; ``None`` (after saying why) if a task did not complete."""
    image, voice = await _submit(client)
    console.print(f"submitted image task {image.id} and voice task {voice.id}")
    done = await _follow_both(client, console, image, voice)
    failed = [t for t in done if t.status != task_pb2.TASK_STATUS_COMPLETED]
    for task in failed:
        status = task_pb2.TaskStatus.Name(task.status)
        console.print(f"[red]task {task.id} ended {status}: {task.error.message}")
    if failed:
        return None
    final_image, final_voice = done
    png = await client.download(final_image.image_result.image_url)
    wav_bytes = await client.download(final_voice.tts_result.audio_url)
    return _Generated(final_image, final_voice, png, wav_bytes)


def _save(console: Console, out_dir: Path, generated: _Generated) -> bool:
    """Check the media, write both files to ``out_dir`` and describe them; ``False`` if the image
    is not a PNG."""
    png, wav_bytes = generated.png, generated.wav
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        console.print("[red]the image is not a PNG")
        return False
    with wave.open(BytesIO(wav_bytes)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    image_path = (out_dir / f"{CHARACTER['id']}-front.png").resolve()
    voice_path = (out_dir / f"{CHARACTER['id']}-voice.wav").resolve()
    image_path.write_bytes(png)
    voice_path.write_bytes(wav_bytes)
    r = generated.image.image_result
    console.print(f"[green]image[/] {r.width}x{r.height} {r.content_type}, {len(png)} bytes → {image_path}")
    console.print(
        f"[green]voice[/] {generated.voice.tts_result.duration_seconds:.2f} s (file says {seconds:.2f} s),"
        f" {len(wav_bytes)} bytes → {voice_path}"
    )
    return True


async def demo(out_dir: Path, verbose: bool = False) -> int:
    console = Console()
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="charai-demo-") as tmp:
        console.print("[bold]Starting charai[/] (nats-server, emulator, task_store, gateway, workers)…")
        async with Stack(Path(tmp), free_ports=True, echo=sys.stdout if verbose else None) as stack:
            console.print(f"gateway gRPC on {stack.gateway_grpc}, HTTP on {stack.gateway_http}")
            async with CharaiClient(stack.gateway_grpc) as client:
                generated = await _generate(client, console)
            if generated is None:
                return 1
        if not _save(console, out_dir, generated):
            return 1
        console.print("stack stopped.")
    return 0
