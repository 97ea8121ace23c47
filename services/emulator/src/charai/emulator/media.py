"""Synthetic media for the provider emulator: real PNG and WAV/PCM bytes, made fast.

Why: workers validate what the provider returns (PNG signature, IHDR size, RIFF header,
sample rate), so the emulator must hand back *real* media, not placeholders. It must also be
cheap enough that a benchmark pushing hundreds of 1024x1024 images per second is limited by
the system under test, not by the emulator. So nothing here loops over individual pixels or
samples in Python: rows and waveform periods are built once and repeated with bytes
multiplication, and zlib (which releases the GIL) does the heavy lifting.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import struct
import sys
import zlib
from array import array
from collections.abc import Callable
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The eight magic bytes every PNG file starts with."""

DEFAULT_SAMPLE_RATE = 24000
"""GLM-TTS answers 24 kHz, 16-bit, mono PCM; the emulator matches it."""

SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.3

_BAND = 32
"""Checkerboard band size in pixels; two prebuilt rows cover every row of the image."""

_TONE_PERIODS = (40, 48, 50, 60, 80)
"""Waveform periods in samples (600, 500, 480, 400, 300 Hz at 24 kHz): integers, so one
period repeats seamlessly."""


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """Frame one PNG chunk: length, type, payload, CRC over type+payload."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _seed_bytes(seed: int) -> bytes:
    """Spread an integer seed into 32 well-mixed bytes so nearby seeds look different."""
    return hashlib.sha256(str(seed).encode()).digest()


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    """Build a valid 8-bit RGB PNG of exactly ``width`` x ``height`` pixels.

    The picture is a horizontal red gradient, a vertical green gradient and a blue
    checkerboard, all shifted by ``seed`` so different prompts give different images.
    Only two distinct row templates exist (checkerboard phase); each output row copies one
    and overwrites its green channel with a single extended-slice assignment, so the cost
    is O(height) Python operations plus zlib, not O(width * height).

    Args:
        width: Image width in pixels (>= 1).
        height: Image height in pixels (>= 1).
        seed: Any integer; the same seed always gives the same bytes.

    Returns:
        The complete PNG file.

    Raises:
        ValueError: If a dimension is not positive.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image dimensions must be positive, got {width}x{height}")
    mix = _seed_bytes(seed)
    r_shift, g_shift, b_lo, b_hi = mix[0], mix[1], mix[2] // 2, 128 + mix[3] // 2
    red = bytes(((x * 256) // width + r_shift) & 0xFF for x in range(width))
    templates: list[bytearray] = []
    for phase in (0, 1):
        row = bytearray(3 * width)
        row[0::3] = red
        row[2::3] = bytes(b_hi if ((x // _BAND) + phase) % 2 else b_lo for x in range(width))
        templates.append(row)
    rows: list[bytes] = []
    for y in range(height):
        row = bytearray(templates[(y // _BAND) % 2])
        row[1::3] = bytes((((y * 256) // height + g_shift) & 0xFF,)) * width
        rows.append(b"\x00" + bytes(row))  # filter type 0 (None) per scanline
    raw = b"".join(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour RGB
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", zlib.compress(raw, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int] | None:
    """Read width and height from a PNG's IHDR, or ``None`` if ``data`` is not a PNG.

    Kept here so tests and tools share one tiny, dependency-free PNG sniffer.
    """
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def audio_seconds(text: str, speed: float) -> float:
    """Duration the emulator's "speech" lasts: about 60 ms per character at speed 1.

    Why: workers and tests reason about duration (e.g. cost, chunking), so it must be a
    predictable function of the input rather than a constant.
    """
    speed = speed if speed > 0 else 1.0
    return max(MIN_SECONDS, SECONDS_PER_CHAR * len(text) / speed)


def sample_count(text: str, speed: float, sample_rate: int = DEFAULT_SAMPLE_RATE) -> int:
    """Samples :func:`make_pcm` renders for ``text``: the exact duration the call log reports."""
    return max(1, round(audio_seconds(text, speed) * sample_rate))


@functools.lru_cache(maxsize=256)
def _segment(period: int, per_char: int, amplitude: int) -> bytes:
    """One character's tone: ``per_char`` samples of a sine wave of ``period`` samples (the same
    few tones recur in every clip, so each is computed once per process)."""
    return (_period(period, amplitude) * (per_char // period + 1))[: 2 * per_char]


def _period(samples: int, amplitude: int) -> bytes:
    """One period of a sine wave as native-endian int16 samples."""
    wave_samples = array("h", (int(amplitude * math.sin(2 * math.pi * i / samples)) for i in range(samples)))
    if sys.byteorder != "little":
        wave_samples.byteswap()
    return wave_samples.tobytes()


def make_pcm(
    text: str, speed: float = 1.0, sample_rate: int = DEFAULT_SAMPLE_RATE, volume: float = 1.0
) -> bytes:
    """Render ``text`` as raw s16le mono PCM: one short tone per character.

    Letters get one of five pitches (by code point), whitespace and punctuation get
    silence, so the output sounds vaguely like syllables and differs between texts. Each
    pitch is one precomputed period repeated with bytes multiplication; per character
    there is one slice, never a per-sample Python loop.

    Args:
        text: The text being "spoken"; its length sets the duration.
        speed: Playback speed; higher is shorter (GLM-TTS accepts 0.5-2).
        sample_rate: Samples per second.
        volume: Loudness factor; GLM-TTS accepts (0, 10], 1 is normal.

    Returns:
        Little-endian signed 16-bit samples, mono, no header; length is even.
    """
    speed = speed if speed > 0 else 1.0
    total = sample_count(text, speed, sample_rate)
    per_char = max(1, round(SECONDS_PER_CHAR * sample_rate / speed))
    amplitude = max(1, min(32000, int(6000 * volume)))
    scale = sample_rate / DEFAULT_SAMPLE_RATE
    silence = b"\x00\x00" * per_char
    tones = len(_TONE_PERIODS)
    parts = [
        _segment(max(2, round(_TONE_PERIODS[ord(ch) % tones] * scale)), per_char, amplitude)
        if ch.isalnum()
        else silence
        for ch in text
    ]
    pcm = b"".join(parts)
    if len(pcm) < 2 * total:
        pcm += b"\x00\x00" * (total - len(pcm) // 2)
    return pcm[: 2 * total]


def make_wav(
    text: str, speed: float = 1.0, sample_rate: int = DEFAULT_SAMPLE_RATE, volume: float = 1.0
) -> bytes:
    """Wrap :func:`make_pcm` output in a RIFF/WAVE header (16-bit mono).

    The header is :func:`wav_header`'s, byte for byte what the stdlib ``wave`` writer writes
    (a unit test compares them).
    """
    pcm = make_pcm(text, speed, sample_rate, volume)
    return wav_header(sample_rate, len(pcm)) + pcm


#: Clips of up to this many samples (20 s at 24 kHz) are rendered on the event loop: with the
#: tones cached that takes tens of microseconds, less than a hop to a worker thread and back.
INLINE_SAMPLES = 480_000


async def render_speech(make: Callable[..., bytes], text: str, speed: float, *args: Any) -> bytes:
    """``make(text, speed, *args)`` (a clip of ``text``): on the event loop when the clip is
    short (:data:`INLINE_SAMPLES`), else in a worker thread so a long one does not hold the loop."""
    if sample_count(text, speed) <= INLINE_SAMPLES:
        return make(text, speed, *args)
    return await asyncio.to_thread(make, text, speed, *args)


def wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """A 44-byte canonical WAV header announcing ``data_bytes`` of 16-bit mono samples.

    Why: the ``huge`` failure mode streams a body far larger than memory should hold, so
    it cannot use the ``wave`` writer (which needs all frames); it writes this header and
    then streams zeros.
    """
    data_bytes = min(data_bytes, 0xFFFFFFFF - 36)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )
