"""Composition root of the TTS worker."""

from __future__ import annotations

from charai.tts_worker.handler import TtsHandler
from charai.worker.app import WorkerApp
from charai.worker.context import Handler
from charai.worker.http import ProviderConfig
from charai.worker.settings import TtsWorkerSettings


def build(settings: TtsWorkerSettings, handler: Handler | None = None) -> WorkerApp:
    """The TTS worker; ``handler``: another handler of TTS jobs in its place (the benchmarks'
    :mod:`charai.devstack.noop_worker`), :class:`TtsHandler` by default."""
    provider = ProviderConfig(
        base_url=settings.tts_api_base_url,
        api_key=settings.tts_api_key.get_secret_value(),
        model=settings.tts_model,
        key_setting="CHARAI_TTS_API_KEY",
        dialect=settings.tts_provider,
        timeout=settings.tts_timeout_seconds,
        allow_private_urls=settings.provider_allow_private_urls,
    )
    return WorkerApp(settings, "tts", handler or TtsHandler(), provider, settings.tts_concurrency)
