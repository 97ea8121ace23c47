"""How one emulator behaves: the settings a test, ``make demo`` or a benchmark picks."""

from __future__ import annotations

from dataclasses import dataclass, field

from charai.emulator.dialects import DIALECTS, ZHIPU


@dataclass
class EmulatorConfig:
    """How the emulator behaves; every field has a demo-friendly default.

    Attributes:
        latency_min: Lower bound of the simulated generation time, seconds.
        latency_max: Upper bound; each call draws uniformly from [min, max].
        async_poll_steps: Async tasks answer ``PROCESSING`` to at least this many polls.
        api_key: If set, API calls must send ``Authorization: Bearer <key>`` (never logged,
            hidden from ``repr``).
        max_concurrency: In-flight generation calls above this get 429/1302, like the
            real per-account concurrency limit. ``None`` means unlimited.
        seed: Makes latencies, images and garbage bytes reproducible.
        file_cache_size: How many generated files ``/files`` keeps (LRU).
        max_tasks: How many async tasks are remembered (oldest dropped first).
        public_url: Base for returned file URLs; default is the request's own scheme and
            Host header, so clients reach the files at the address they already use.
        dialects: The APIs served: ``zhipu`` (under ``/api/paas/v4``) and/or ``openai`` (under
            ``/v1``); the routes of the others answer 404.
        call_log_size: How many calls the ``log`` of ``/_emulator/stats`` keeps (oldest dropped).
    """

    latency_min: float = 0.2
    latency_max: float = 0.6
    async_poll_steps: int = 3
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int | None = None
    seed: int = 0
    file_cache_size: int = 256
    max_tasks: int = 10_000
    public_url: str | None = None
    dialects: frozenset[str] = frozenset({ZHIPU})
    call_log_size: int = 2000

    def __post_init__(self) -> None:
        """Reject nonsense early, at start-up, rather than on the first request."""
        if self.latency_min < 0 or self.latency_max < self.latency_min:
            raise ValueError(f"bad latency range {self.latency_min}..{self.latency_max}")
        if self.async_poll_steps < 0:
            raise ValueError("async_poll_steps must be >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        if self.file_cache_size < 1 or self.max_tasks < 1:
            raise ValueError("file_cache_size and max_tasks must be >= 1")
        if not self.dialects or not set(self.dialects) <= set(DIALECTS):
            raise ValueError(
                f"dialects must be a non-empty subset of {DIALECTS}, got {sorted(self.dialects)}"
            )
        if self.call_log_size < 0:
            raise ValueError("call_log_size must be >= 0")
