"""charai image worker: runs image generation jobs against the provider."""

from __future__ import annotations

from charai.image_worker.handler import ImageHandler

__all__ = ["ImageHandler"]
