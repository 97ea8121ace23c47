"""One line per generation call, for tests that check usage metering against what the
"provider" actually did.

Why: charai meters every provider call per tenant (images by size and quality, characters of
speech, seconds of audio). A test can only prove the meter exact if the provider keeps its own
account of each call: what was asked (model, size, quality, formats, ``n``, voice, speed, input
length), how it was answered (status) and what it delivered (images, audio duration).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TEXT_CHARS = 80
"""How much of the prompt/input a record keeps (the same cut as ``by_text``)."""

_STR_FIELDS = ("model", "size", "quality", "response_format", "output_format", "voice")


@dataclass
class CallRecord:
    """What one generation call asked for and got (``/_emulator/stats`` ``log`` entries).

    Fields are filled from the request body as received, then replaced by the effective values
    (defaults applied) once the request is valid; a refused request keeps what it sent.

    Attributes:
        dialect: ``zhipu`` or ``openai``.
        route: The ``calls`` counter name, e.g. ``openai.audio.speech``.
        text: The prompt or input, cut to 80 characters (markers included).
        input_chars: Characters of the whole prompt/input as sent.
        model, size, quality, response_format, output_format, n, voice, speed: The request.
        width, height: Pixels of each image produced.
        status: HTTP status of the answer (``None`` while in flight or if the client gave up).
        mode: The failure mode that fired, if any.
        images: Images delivered in a successful answer (0 otherwise).
        audio_seconds: Duration of the audio delivered in a successful answer (samples / rate).
        audio_bytes: Size of that audio body.
    """

    dialect: str
    route: str
    text: str = ""
    input_chars: int = 0
    model: str | None = None
    size: str | None = None
    quality: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    n: int | None = None
    voice: str | None = None
    speed: float | None = None
    width: int | None = None
    height: int | None = None
    status: int | None = None
    mode: str | None = None
    images: int = 0
    audio_seconds: float | None = None
    audio_bytes: int | None = None

    @classmethod
    def from_body(cls, dialect: str, route: str, body: Any, text: str) -> CallRecord:
        """The record of a call as received (before validation); odd types are left out."""
        record = cls(dialect=dialect, route=route, text=text[:TEXT_CHARS], input_chars=len(text))
        if not isinstance(body, dict):
            return record
        for name in _STR_FIELDS:
            value = body.get(name)
            if isinstance(value, str):
                setattr(record, name, value)
        count = body.get("n")
        if isinstance(count, int) and not isinstance(count, bool):
            record.n = count
        speed = body.get("speed")
        if isinstance(speed, int | float) and not isinstance(speed, bool):
            record.speed = float(speed)
        return record

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)
