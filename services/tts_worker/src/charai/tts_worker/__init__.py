"""charai TTS worker: runs text-to-speech jobs against the provider."""

from __future__ import annotations

from charai.tts_worker.handler import TtsHandler

__all__ = ["TtsHandler"]
