"""The emulator's speech: the clip it renders is the one it always rendered (tones now cached per
process, the WAV header written without the ``wave`` writer), and a short clip is rendered on the
event loop, a long one in a worker thread."""

from __future__ import annotations

import io
import math
import sys
import threading
import wave
from array import array

import pytest
from charai.emulator import media

TEXTS = ["a", "noop b2-1-abcdef 1234", "Hello, world! 你好", "x" * 400, " ,.;"]


def reference_pcm(text: str, speed: float, sample_rate: int, volume: float) -> bytes:
    """make_pcm as it was before its tones were cached: every tone computed per call."""
    speed = speed if speed > 0 else 1.0
    total = media.sample_count(text, speed, sample_rate)
    per_char = max(1, round(media.SECONDS_PER_CHAR * sample_rate / speed))
    amplitude = max(1, min(32000, int(6000 * volume)))
    scale = sample_rate / media.DEFAULT_SAMPLE_RATE
    silence = b"\x00\x00" * per_char
    parts = []
    for ch in text:
        if not ch.isalnum():
            parts.append(silence)
            continue
        period = max(2, round(media._TONE_PERIODS[ord(ch) % len(media._TONE_PERIODS)] * scale))
        one = array("h", (int(amplitude * math.sin(2 * math.pi * i / period)) for i in range(period)))
        if sys.byteorder != "little":
            one.byteswap()
        parts.append((one.tobytes() * (per_char // period + 1))[: 2 * per_char])
    pcm = b"".join(parts)
    if len(pcm) < 2 * total:
        pcm += b"\x00\x00" * (total - len(pcm) // 2)
    return pcm[: 2 * total]


def wave_writer(pcm: bytes, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm)
    return buffer.getvalue()


SETTINGS = [(1.0, 24000, 1.0), (2.0, 8000, 0.5), (0.5, 44100, 3.0)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("speed", "rate", "volume"), SETTINGS)
def test_a_clip_is_the_one_rendered_before_and_its_wav_the_wave_writers(
    text: str, speed: float, rate: int, volume: float
) -> None:
    for _ in range(2):  # computed, then from the cache
        pcm = media.make_pcm(text, speed, rate, volume)
        assert pcm == reference_pcm(text, speed, rate, volume)
        assert media.make_wav(text, speed, rate, volume) == wave_writer(pcm, rate)


async def test_a_short_clip_is_rendered_on_the_loop_and_a_long_one_in_a_thread() -> None:
    loop_thread = threading.get_ident()
    where: list[bool] = []

    def make(text: str, speed: float, rate: int, volume: float) -> bytes:
        where.append(threading.get_ident() == loop_thread)
        return media.make_wav(text, speed, rate, volume)

    short = "a short line"
    long = "x" * (media.INLINE_SAMPLES // round(media.SECONDS_PER_CHAR * media.DEFAULT_SAMPLE_RATE) + 1)
    assert media.sample_count(long, 1.0) > media.INLINE_SAMPLES
    for text in (short, long):
        got = await media.render_speech(make, text, 1.0, media.DEFAULT_SAMPLE_RATE, 1.0)
        assert got == media.make_wav(text, 1.0, media.DEFAULT_SAMPLE_RATE, 1.0)
    assert where == [True, False]
