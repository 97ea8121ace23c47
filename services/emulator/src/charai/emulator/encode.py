"""Media the OpenAI dialect needs beyond PNG and WAV: JPEG and WebP images (Pillow) and MP3
speech (LAME, through ``lameenc``).

Why separate from :mod:`charai.emulator.media`: that module is dependency-free and fast enough
for benchmarks; these conversions use native libraries and are only paid for when a request
asks for the format. The MP3 encoder settings match tts_worker's (64 kbps mono CBR), so an MP3
the "provider" returns looks like one charai would have encoded itself.
"""

from __future__ import annotations

import io

import lameenc
from charai.emulator import media
from PIL import Image

IMAGE_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
"""Image output formats and their media types."""

AUDIO_TYPES: dict[str, str] = {"mp3": "audio/mpeg", "wav": "audio/wav", "pcm": "audio/pcm"}
"""Speech formats the emulator produces and their media types (opus, aac and flac it cannot)."""

MP3_KBPS = 64
MP3_QUALITY = 2


def make_image(width: int, height: int, seed: int, fmt: str) -> bytes:
    """A real ``fmt`` image (png, jpeg or webp) of exactly ``width`` x ``height`` pixels.

    Raises:
        ValueError: Unknown format or non-positive dimensions.
    """
    png = media.make_png(width, height, seed)
    if fmt == "png":
        return png
    if fmt not in IMAGE_TYPES:
        raise ValueError(f"unknown image format {fmt!r}")
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format=fmt.upper(), quality=85)
    return out.getvalue()


def encode_mp3(pcm: bytes, rate: int = media.DEFAULT_SAMPLE_RATE) -> bytes:
    """16-bit little-endian mono PCM as constant-bit-rate MP3 (a trailing odd byte is dropped).

    Raises:
        ValueError: No whole sample.
    """
    whole = pcm[: len(pcm) - len(pcm) % 2]
    if not whole:
        raise ValueError("no audio samples")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_KBPS)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(1)
    encoder.set_quality(MP3_QUALITY)
    encoder.silence()
    return bytes(encoder.encode(whole)) + bytes(encoder.flush())


def make_speech(text: str, speed: float, fmt: str, rate: int = media.DEFAULT_SAMPLE_RATE) -> bytes:
    """``text`` "spoken" as ``fmt`` (mp3, wav or pcm: 24 kHz s16le mono)."""
    if fmt == "wav":
        return media.make_wav(text, speed, rate)
    pcm = media.make_pcm(text, speed, rate)
    if fmt == "pcm":
        return pcm
    if fmt == "mp3":
        return encode_mp3(pcm, rate)
    raise ValueError(f"the emulator cannot produce {fmt}")
