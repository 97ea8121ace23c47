"""Composition root of the image worker."""

from __future__ import annotations

from charai.image_worker.handler import ImageHandler
from charai.worker.app import WorkerApp
from charai.worker.http import ProviderConfig
from charai.worker.settings import ImageWorkerSettings


def build(settings: ImageWorkerSettings) -> WorkerApp:
    provider = ProviderConfig(
        base_url=settings.image_api_base_url,
        api_key=settings.image_api_key.get_secret_value(),
        model=settings.image_model,
        key_setting="CHARAI_IMAGE_API_KEY",
        dialect=settings.image_provider,
        timeout=settings.image_timeout_seconds,
        allow_private_urls=settings.provider_allow_private_urls,
    )
    handler = ImageHandler(async_mode=settings.image_async_mode, poll_interval=settings.image_poll_seconds)
    return WorkerApp(settings, "image", handler, provider, settings.image_concurrency)
