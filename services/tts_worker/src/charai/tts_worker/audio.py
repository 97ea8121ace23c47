"""WAV/PCM parsing and conversion, gain, and MP3 encoding, for what a TTS provider returns.

Why by hand rather than the stdlib ``wave`` module: GLM-TTS (like many streaming encoders) may
write a WAV header whose data-chunk size is ``0`` or ``0xFFFFFFFF`` because it did not know the
length when it started; ``wave`` then reads no frames or fails. The parser here walks the RIFF
chunks itself, takes the remaining bytes in that case, and rejects everything else that is not
16-bit PCM with a reason a human can act on. Pure: bytes in, bytes or facts out; no I/O.
"""

from __future__ import annotations

import array
import math
import struct
import sys
from typing import NamedTuple

import lameenc

DEFAULT_RATE = 24000
"""GLM-TTS answers 24 kHz, 16-bit, mono PCM."""

MP3_KBPS_PER_CHANNEL = 64
"""Constant bit rate per channel: plenty for speech at 24 kHz, about 8 KB per second."""

MP3_QUALITY = 2
"""LAME's algorithm quality, 2 = best (speech clips are short, so the extra CPU is cheap)."""

_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})
"""Data-chunk sizes that streaming writers use for "until the end of the file"."""

_FORMAT_PCM = 0x0001
_FORMAT_EXTENSIBLE = 0xFFFE
_MAX_DATA = 0xFFFFFFFF - 36


class BadAudioError(ValueError):
    """The bytes are not audio we can use; the message says why."""


class WavInfo(NamedTuple):
    """Facts of a WAV file's PCM payload."""

    sample_rate: int
    channels: int
    sample_width: int
    frames: int
    duration_seconds: float


class _Layout(NamedTuple):
    rate: int
    channels: int
    width: int
    start: int
    length: int


def _parse_fmt(chunk: bytes) -> tuple[int, int, int]:
    """(rate, channels, bytes per sample) of a ``fmt `` chunk that describes 16-bit PCM."""
    if len(chunk) < 16:
        raise BadAudioError(f"the fmt chunk is too short ({len(chunk)} bytes)")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _FORMAT_EXTENSIBLE and len(chunk) >= 26:
        # WAVE_FORMAT_EXTENSIBLE: the real format is the first two bytes of the SubFormat GUID.
        (tag,) = struct.unpack_from("<H", chunk, 24)
    if tag != _FORMAT_PCM:
        raise BadAudioError(f"not PCM audio (format tag {tag:#06x})")
    if bits != 16:
        raise BadAudioError(f"not 16-bit PCM ({bits} bits per sample)")
    if channels < 1:
        raise BadAudioError("the fmt chunk declares no channels")
    if rate < 1:
        raise BadAudioError("the fmt chunk declares no sample rate")
    return rate, channels, 2


def _layout(data: bytes) -> _Layout:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BadAudioError(f"not a RIFF/WAVE file (starts with {data[:12]!r})")
    fmt: tuple[int, int, int] | None = None
    found: tuple[int, int] | None = None
    offset = 12
    while offset + 8 <= len(data):
        kind = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        remaining = len(data) - body
        if kind == b"data":
            if size in _UNKNOWN_SIZES:
                size = remaining
            elif size > remaining:
                raise BadAudioError(f"truncated: the data chunk declares {size} bytes but {remaining} follow")
            if found is None:
                found = (body, size)
            if fmt is not None:
                break
        elif kind == b"fmt ":
            if size > remaining:
                raise BadAudioError("truncated inside the fmt chunk")
            fmt = _parse_fmt(data[body : body + size])
            if found is not None:
                break
        elif size > remaining:
            break  # a trailing chunk we do not need is cut off; what we need may be complete
        offset = body + size + (size & 1)  # chunks are word-aligned
    if fmt is None:
        raise BadAudioError("no fmt chunk")
    if found is None:
        raise BadAudioError("no data chunk")
    rate, channels, width = fmt
    start, length = found
    if length == 0:
        raise BadAudioError("the data chunk is empty")
    if length % (channels * width):
        raise BadAudioError(f"the data chunk holds {length} bytes, not whole {channels * width}-byte frames")
    return _Layout(rate, channels, width, start, length)


def wav_info(data: bytes) -> WavInfo:
    """Reads a WAV file's format and length without copying its samples.

    Raises:
        BadAudioError: Not RIFF/WAVE, no fmt or data chunk, not 16-bit PCM, truncated, empty,
            or not whole sample frames.
    """
    layout = _layout(data)
    frames = layout.length // (layout.channels * layout.width)
    return WavInfo(layout.rate, layout.channels, layout.width, frames, frames / layout.rate)


def wav_to_pcm(data: bytes) -> tuple[bytes, int, int, int]:
    """The raw samples of a WAV file: ``(pcm, sample_rate, channels, sample_width)``.

    Raises:
        BadAudioError: As :func:`wav_info`.
    """
    layout = _layout(data)
    pcm = data[layout.start : layout.start + layout.length]
    return pcm, layout.rate, layout.channels, layout.width


def _check_pcm(pcm: bytes, rate: int, channels: int, width: int) -> None:
    if rate < 1 or channels < 1 or not 1 <= width <= 4:
        raise BadAudioError(f"bad PCM parameters (rate {rate}, channels {channels}, width {width})")
    if not pcm:
        raise BadAudioError("no audio samples")
    if len(pcm) % (channels * width):
        raise BadAudioError(f"{len(pcm)} bytes are not whole {channels * width}-byte sample frames")


def pcm_duration(pcm: bytes, rate: int = DEFAULT_RATE, width: int = 2, channels: int = 1) -> float:
    """Seconds of audio in raw PCM.

    Raises:
        BadAudioError: Empty, or not whole sample frames (e.g. an odd byte count of 16-bit audio).
    """
    _check_pcm(pcm, rate, channels, width)
    return len(pcm) / (rate * channels * width)


def pcm_to_wav(pcm: bytes, rate: int = DEFAULT_RATE, channels: int = 1, width: int = 2) -> bytes:
    """Wraps raw little-endian PCM in a canonical 44-byte RIFF/WAVE header.

    Raises:
        BadAudioError: Empty, not whole sample frames, or too long for a WAV file.
    """
    _check_pcm(pcm, rate, channels, width)
    if len(pcm) > _MAX_DATA:
        raise BadAudioError("too much audio for one WAV file")
    align = channels * width
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, _FORMAT_PCM, channels, rate, rate * align, align, 8 * width)
    return header + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm


def apply_gain(pcm: bytes, gain: float) -> bytes:
    """16-bit little-endian PCM with every sample scaled by ``gain``, clipped to the 16-bit range.

    Why: OpenAI's ``audio/speech`` has no ``volume`` (Zhipu's has), so a TTS task that asks for a
    volume other than 1 gets it applied here, on the samples, before encoding. Linear scaling
    like Zhipu's ``volume`` (1 = as generated); clipping instead of wrapping around.

    Raises:
        BadAudioError: An odd byte count (not whole 16-bit samples), or a gain that is not > 0.
    """
    if not gain > 0 or gain == math.inf:
        raise BadAudioError(f"bad gain {gain}")
    if len(pcm) % 2:
        raise BadAudioError(f"{len(pcm)} bytes are not whole 16-bit samples")
    samples = array.array("h", pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    # One table of every possible sample: 65,536 multiplications rather than one per sample
    # (a minute of 24 kHz speech has 1.4 million), and a plain lookup in the loop.
    table = [max(-32768, min(32767, round(v * gain))) for v in range(-32768, 32768)]
    scaled = array.array("h", [table[v + 32768] for v in samples])
    if sys.byteorder == "big":
        scaled.byteswap()
    return scaled.tobytes()


def encode_mp3(pcm: bytes, rate: int = DEFAULT_RATE, channels: int = 1) -> bytes:
    """Encodes 16-bit little-endian PCM as constant-bit-rate MP3 (64 kbps per channel).

    A trailing partial sample frame is dropped rather than fed to LAME, which would misalign
    every following sample.

    Raises:
        BadAudioError: No whole sample frame, or more than two channels (MP3 has at most two).
    """
    if channels not in (1, 2):
        raise BadAudioError(f"MP3 holds one or two channels, not {channels}")
    if rate < 1:
        raise BadAudioError(f"bad sample rate {rate}")
    align = 2 * channels
    whole = pcm[: len(pcm) - len(pcm) % align]
    if not whole:
        raise BadAudioError("no audio samples")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_KBPS_PER_CHANNEL * channels)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(channels)
    encoder.set_quality(MP3_QUALITY)
    encoder.silence()
    return bytes(encoder.encode(whole)) + bytes(encoder.flush())


class Mp3Info(NamedTuple):
    """Facts of an MP3 stream, from its frame headers."""

    sample_rate: int
    channels: int
    frames: int
    duration_seconds: float


# MPEG version bits -> index (1 = MPEG-1, 2 = MPEG-2, 3 = MPEG-2.5); 0b01 is reserved.
_VERSIONS = {0b11: 1, 0b10: 2, 0b00: 3}
_RATES = {1: (44100, 48000, 32000), 2: (22050, 24000, 16000), 3: (11025, 12000, 8000)}
_L3_KBPS = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}


def _skip_id3(data: bytes) -> int:
    if len(data) >= 10 and data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        return 10 + size + (10 if data[5] & 0x10 else 0)
    return 0


def mp3_info(data: bytes) -> Mp3Info:
    """Walks the MPEG Layer III frames of ``data`` (after an optional ID3v2 tag).

    Why: a provider that answers MP3 itself must still get a duration computed from the audio,
    and tests use it to check what :func:`encode_mp3` wrote. Counts every frame, including a
    Xing/Info header frame, so the duration is an upper bound by at most one frame.

    Raises:
        BadAudioError: No Layer III frame at the start, a broken frame header mid-stream, or a
            last frame cut off (an MP3 a provider sent short: OpenAI's are passed on as they are).
    """
    offset = _skip_id3(data)
    frames = 0
    samples = 0
    rate = channels = 0
    while offset < len(data):
        header = int.from_bytes(data[offset : offset + 4], "big") if offset + 4 <= len(data) else 0
        if header >> 21 != 0x7FF:
            if frames and data[offset:].startswith((b"TAG", b"APETAGEX")):
                break  # ID3v1 / APE trailer
            if frames and offset + 4 > len(data):
                raise BadAudioError(f"the MP3 is cut off after {frames} frames")
            raise BadAudioError(f"no MPEG frame sync at byte {offset}")
        version = _VERSIONS.get((header >> 19) & 0b11)
        layer = (header >> 17) & 0b11
        kbps_index = (header >> 12) & 0xF
        rate_index = (header >> 10) & 0b11
        if version is None or layer != 0b01 or kbps_index in (0, 15) or rate_index == 3:
            raise BadAudioError(f"not an MPEG Layer III frame header at byte {offset}")
        frame_rate = _RATES[version][rate_index]
        kbps = _L3_KBPS[1 if version == 1 else 2][kbps_index]
        per_frame = 1152 if version == 1 else 576
        padding = (header >> 9) & 1
        length = per_frame // 8 * kbps * 1000 // frame_rate + padding
        rate = frame_rate
        channels = 1 if (header >> 6) & 0b11 == 0b11 else 2
        frames += 1
        samples += per_frame
        offset += length
    if offset > len(data):
        raise BadAudioError(f"the MP3 is cut off in frame {frames}")
    if not frames:
        raise BadAudioError("no MPEG audio frames")
    return Mp3Info(rate, channels, frames, samples / rate)


def looks_like_json(data: bytes, content_type: str) -> bool:
    """Whether an answer should be read as JSON rather than as audio.

    True for a JSON content type, or for a body that starts with ``{`` and ends with ``}``
    (Zhipu can send a JSON error with a 200 and an audio content type). Requiring both ends
    keeps raw PCM whose first sample byte happens to be ``{`` from being mistaken for JSON.
    """
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in ("application/json", "text/json") or kind.endswith("+json"):
        return True
    stripped = data.strip()
    return stripped.startswith(b"{") and stripped.endswith(b"}")
