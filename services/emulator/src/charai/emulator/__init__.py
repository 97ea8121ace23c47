"""charai provider emulator: a local HTTP server that speaks the Zhipu v4 and the OpenAI image and
speech APIs (``--dialect zhipu,openai``).

Why: tests, ``make demo`` and benchmarks need a provider that costs nothing, needs no key or
network, answers byte-compatible responses and misbehaves on demand (``[[mode]]`` markers
in the prompt or the ``X-Emulator-Mode`` header). See :mod:`charai.emulator.app`.
"""

from __future__ import annotations

from charai.emulator.app import build_app
from charai.emulator.config import EmulatorConfig
from charai.emulator.runner import RunningEmulator, running_emulator

__all__ = ["EmulatorConfig", "RunningEmulator", "build_app", "running_emulator"]
