"""Pure tests of the TTS worker's WAV/PCM/MP3 helpers."""

from __future__ import annotations

import io
import struct
import wave

import pytest
from charai.tts_worker.audio import (
    BadAudioError,
    encode_mp3,
    looks_like_json,
    mp3_info,
    pcm_duration,
    pcm_to_wav,
    wav_info,
    wav_to_pcm,
)
from hypothesis import given
from hypothesis import strategies as st

RATE = 24000


def tone(seconds: float, rate: int = RATE, channels: int = 1) -> bytes:
    """A cheap non-silent signal: a sawtooth of 16-bit samples."""
    frames = round(seconds * rate)
    return b"".join(struct.pack("<h", (i * 997) % 20000 - 10000) * channels for i in range(frames))


def stdlib_wav(pcm: bytes, rate: int = RATE, channels: int = 1, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return buffer.getvalue()


def with_data_size(wav: bytes, size: int) -> bytes:
    """The canonical 44-byte-header WAV with its data-chunk size field replaced."""
    assert wav[36:40] == b"data"
    return wav[:40] + struct.pack("<I", size) + wav[44:]


# --------------------------------------------------------------------------- wav <-> pcm


def test_pcm_to_wav_is_read_by_the_stdlib() -> None:
    pcm = tone(0.5)
    wav = pcm_to_wav(pcm)
    with wave.open(io.BytesIO(wav)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, RATE)
        assert reader.readframes(reader.getnframes()) == pcm
    assert len(wav) == 44 + len(pcm)


def test_wav_info_of_a_stdlib_file() -> None:
    wav = stdlib_wav(tone(1.25, rate=16000, channels=2), rate=16000, channels=2)
    info = wav_info(wav)
    assert info == (16000, 2, 2, 20000, 1.25)
    assert info.duration_seconds == 1.25


def test_wav_to_pcm_round_trip_keeps_format() -> None:
    pcm = tone(0.3, rate=22050, channels=2)
    assert wav_to_pcm(pcm_to_wav(pcm, 22050, 2)) == (pcm, 22050, 2, 2)


@given(st.binary(max_size=4000).map(lambda b: b[: len(b) - len(b) % 2]).filter(bool))
def test_pcm_wav_pcm_round_trip(pcm: bytes) -> None:
    wav = pcm_to_wav(pcm)
    assert wav_to_pcm(wav) == (pcm, RATE, 1, 2)
    assert wav_info(wav).frames == len(pcm) // 2


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_streaming_placeholder_data_size_uses_the_rest(size: int) -> None:
    pcm = tone(0.2)
    wav = with_data_size(pcm_to_wav(pcm), size)
    assert wav_to_pcm(wav)[0] == pcm
    assert wav_info(wav).duration_seconds == pytest.approx(0.2)


def test_extra_chunks_and_odd_padding_are_skipped() -> None:
    pcm = tone(0.1)
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    odd = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\x00"  # odd size, one pad byte
    data = b"data" + struct.pack("<I", len(pcm)) + pcm
    body = b"WAVE" + odd + fmt + data + b"id3 " + struct.pack("<I", 4) + b"xxxx"
    wav = b"RIFF" + struct.pack("<I", len(body)) + body
    assert wav_to_pcm(wav)[0] == pcm


def test_data_before_fmt_is_accepted() -> None:
    pcm = tone(0.1)
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    body = b"WAVE" + b"data" + struct.pack("<I", len(pcm)) + pcm + fmt
    assert wav_info(b"RIFF" + struct.pack("<I", len(body)) + body).frames == len(pcm) // 2


def test_extensible_pcm_is_accepted() -> None:
    pcm = tone(0.1)
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    ext = struct.pack("<HHI", 22, 16, 4) + struct.pack("<H", 1) + guid_tail
    fmt_body = struct.pack("<HHIIHH", 0xFFFE, 1, RATE, RATE * 2, 2, 16) + ext
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    assert wav_to_pcm(b"RIFF" + struct.pack("<I", len(body)) + body)[0] == pcm


# --------------------------------------------------------------------------- malformed wav


def make_wav_with_fmt(
    tag: int = 1, bits: int = 16, channels: int = 1, pcm: bytes = b"\x00\x00" * 10
) -> bytes:
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, tag, channels, RATE, RATE * 2, 2, bits)
    body = b"WAVE" + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "not a RIFF/WAVE"),
        (b"\x00" * 100, "not a RIFF/WAVE"),
        (b'{"error": {"code": "1301"}}', "not a RIFF/WAVE"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
        (make_wav_with_fmt()[:36], "no data chunk"),
        (make_wav_with_fmt(tag=3, bits=32), "not PCM"),
        (make_wav_with_fmt(tag=0x55), "not PCM"),
        (make_wav_with_fmt(bits=8), "not 16-bit"),
        (make_wav_with_fmt(bits=24), "not 16-bit"),
        (make_wav_with_fmt(channels=0), "no channels"),
        (make_wav_with_fmt(pcm=b""), "empty"),
        (make_wav_with_fmt(pcm=b"\x00\x00\x00"), "whole"),
        (make_wav_with_fmt(channels=2, pcm=b"\x00" * 6), "whole"),
        (make_wav_with_fmt(pcm=b"\x00\x00" * 100)[:100], "truncated"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00", "truncated inside the fmt chunk"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt \x04\x00\x00\x00\x01\x00\x01\x00", "too short"),
    ],
)
def test_malformed_wav_is_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadAudioError, match=reason):
        wav_info(data)
    with pytest.raises(BadAudioError, match=reason):
        wav_to_pcm(data)


def test_placeholder_size_with_odd_remainder_is_rejected() -> None:
    wav = with_data_size(pcm_to_wav(tone(0.1)), 0xFFFFFFFF) + b"\x01"
    with pytest.raises(BadAudioError, match="whole"):
        wav_info(wav)


def test_bad_audio_error_is_a_value_error() -> None:
    assert issubclass(BadAudioError, ValueError)


# --------------------------------------------------------------------------- pcm


def test_pcm_duration() -> None:
    assert pcm_duration(b"\x00\x00" * RATE) == 1.0
    assert pcm_duration(b"\x00\x00" * 8000, rate=16000) == 0.5
    assert pcm_duration(b"\x00" * 4 * 24000, channels=2) == 1.0


@pytest.mark.parametrize("pcm", [b"", b"\x00", b"\x00" * 4801])
def test_pcm_duration_rejects_empty_and_odd(pcm: bytes) -> None:
    with pytest.raises(BadAudioError):
        pcm_duration(pcm)


@pytest.mark.parametrize("pcm", [b"", b"\x00\x00\x00"])
def test_pcm_to_wav_rejects_empty_and_odd(pcm: bytes) -> None:
    with pytest.raises(BadAudioError):
        pcm_to_wav(pcm)


def test_pcm_to_wav_rejects_partial_stereo_frame() -> None:
    with pytest.raises(BadAudioError, match="whole 4-byte"):
        pcm_to_wav(b"\x00" * 6, channels=2)


# --------------------------------------------------------------------------- mp3


def starts_like_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def test_encode_mp3_mono_24k() -> None:
    pcm = tone(1.0)
    mp3 = encode_mp3(pcm, RATE, 1)
    assert starts_like_mp3(mp3)
    info = mp3_info(mp3)
    assert (info.sample_rate, info.channels) == (RATE, 1)
    # LAME adds an encoder delay and pads the last frame: at most a few frames (24 ms each) more.
    assert 1.0 <= info.duration_seconds < 1.2
    # 64 kbps constant bit rate: about 8000 bytes per second.
    assert 7000 < len(mp3) < 10000


def test_encode_mp3_stereo() -> None:
    mp3 = encode_mp3(tone(0.5, rate=44100, channels=2), 44100, 2)
    info = mp3_info(mp3)
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert 0.5 <= info.duration_seconds < 0.7


@pytest.mark.parametrize("extra", [1, 3])
def test_encode_mp3_drops_a_partial_frame(extra: int) -> None:
    pcm = tone(0.2)
    assert encode_mp3(pcm + b"\x7f" * extra, RATE, 1)[:4] == encode_mp3(pcm, RATE, 1)[:4]
    assert (
        mp3_info(encode_mp3(pcm + b"\x7f" * extra, RATE, 1)).frames
        == mp3_info(encode_mp3(pcm, RATE, 1)).frames
    )


@pytest.mark.parametrize(
    ("pcm", "channels"), [(b"", 1), (b"\x00", 1), (b"\x00\x00", 3), (b"\x00\x00\x00", 2)]
)
def test_encode_mp3_rejects_unusable_input(pcm: bytes, channels: int) -> None:
    with pytest.raises(BadAudioError):
        encode_mp3(pcm, RATE, channels)


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"RIFF0000WAVE", b"\xff\xfb\x00\x00"])
def test_mp3_info_rejects_non_mp3(data: bytes) -> None:
    with pytest.raises(BadAudioError):
        mp3_info(data)


def test_mp3_info_skips_an_id3_tag() -> None:
    mp3 = encode_mp3(tone(0.3), RATE, 1)
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10
    assert mp3_info(tag + mp3) == mp3_info(mp3)


# --------------------------------------------------------------------------- json sniffing


@pytest.mark.parametrize(
    ("data", "content_type", "expected"),
    [
        (b'{"audio_content": "UklGR"}', "application/json", True),
        (b"not json at all", "application/json; charset=utf-8", True),
        (b'{"error": {"code": "1301"}}', "audio/wav", True),
        (b'  \n{"audio_url": "http://x"}\n', "application/octet-stream", True),
        (b"{", "audio/pcm", False),  # a PCM sample that happens to be "{"
        (b"{\x00\x01\x02", "audio/pcm", False),
        (b"RIFF....WAVE", "audio/wav", False),
        (b"", "", False),
        (b"[1, 2]", "application/problem+json", True),
    ],
)
def test_looks_like_json(data: bytes, content_type: str, expected: bool) -> None:
    assert looks_like_json(data, content_type) is expected
