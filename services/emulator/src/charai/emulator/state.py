"""What one emulator app remembers between calls: the call log and counters behind
``/_emulator/stats``, the generated files behind ``/files``, async image tasks, and the gate."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from charai.emulator.calllog import CallRecord
from charai.emulator.config import EmulatorConfig
from charai.emulator.gate import Gate
from charai.emulator.modes import Marker
from charai.emulator.validation import ImageParams

ROUTES: tuple[str, ...] = (
    "images.generations",
    "async.images.generations",
    "async-result",
    "audio.speech",
    "openai.images.generations",
    "openai.audio.speech",
    "files",
)
"""Names used as keys of ``stats()["calls"]``."""


@dataclass
class AsyncTask:
    """One async image job: when it becomes ready and how it should end."""

    task_id: str
    model: str
    request_id: str
    ready_at: float
    params: ImageParams
    mode: Marker | None
    record: CallRecord | None = None
    polls: int = 0
    items: list[dict[str, str]] | None = None
    finished: bool = False


class EmulatorState:
    """Counters, generated files and async tasks shared by all handlers of one app.

    Everything runs on one event loop, so plain dicts suffice (no locks).
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._latency_rng = random.Random(config.seed)
        self._garbage_rng = random.Random(config.seed + 1)
        self.files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.tasks: OrderedDict[str, AsyncTask] = OrderedDict()
        self.current = 0
        #: Holds generation calls while closed (tests arrange "calls in flight" with it).
        self.gate = Gate()
        self.reset()

    def reset(self) -> None:
        """Zero all counters (including ``*N`` progress); keep files, tasks, in-flight count and gate."""
        self.calls: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.modes: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_text: dict[str, int] = {}
        #: The W3C ``traceparent`` header of the last call per text (tests follow traces with it).
        self.traceparents: dict[str, str] = {}
        self.peak = self.current
        self.rejected = 0
        self.cancelled = 0
        self.tasks_created = 0
        self.tasks_succeeded = 0
        self.tasks_failed = 0
        #: One :class:`CallRecord` per generation call, oldest first (bounded).
        self.call_log: deque[CallRecord] = deque(maxlen=self.config.call_log_size)
        self.calls_logged = 0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters (the ``/_emulator/stats`` body)."""
        return {
            "calls": dict(self.calls),
            "total_calls": sum(v for k, v in self.calls.items() if k != "files"),
            "modes": dict(self.modes),
            "statuses": dict(self.statuses),
            "concurrency": {
                "current": self.current,
                "peak": self.peak,
                "limit": self.config.max_concurrency,
                "rejected": self.rejected,
            },
            "by_key": dict(self.by_key),
            "by_text": dict(self.by_text),
            "traceparents": dict(self.traceparents),
            "tasks": {
                "created": self.tasks_created,
                "succeeded": self.tasks_succeeded,
                "failed": self.tasks_failed,
            },
            "cancelled": self.cancelled,
            "files_stored": len(self.files),
            "gate": self.gate_snapshot(),
            "dialects": sorted(self.config.dialects),
            "log": [record.as_dict() for record in self.call_log],
            "log_dropped": self.calls_logged - len(self.call_log),
        }

    def gate_snapshot(self) -> dict[str, Any]:
        """The gate's state (the ``/_emulator/gate`` body): open or not, calls held now."""
        return {"open": self.gate.is_open, "held": self.gate.held}

    def count_key(self, text: str) -> int:
        """Count one call for ``text``'s call key; return how many calls preceded it."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        prior = self.by_key.get(digest, 0)
        self.by_key[digest] = prior + 1
        short = text[:80]
        self.by_text[short] = self.by_text.get(short, 0) + 1
        return prior

    def log_call(self, record: CallRecord) -> None:
        """Append a call's record (it is filled in as the call goes on)."""
        self.call_log.append(record)
        self.calls_logged += 1

    def count_mode(self, name: str) -> None:
        """Record that a failure mode actually fired."""
        self.modes[name] = self.modes.get(name, 0) + 1

    def record_status(self, status: int) -> None:
        """Record the HTTP status of one API answer."""
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def enter(self) -> bool:
        """Start an in-flight call; ``False`` (already undone) if over ``max_concurrency``."""
        self.current += 1
        limit = self.config.max_concurrency
        if limit is not None and self.current > limit:
            self.current -= 1
            self.rejected += 1
            return False
        self.peak = max(self.peak, self.current)
        return True

    def leave(self) -> None:
        """Finish an in-flight call started with :meth:`enter`."""
        self.current -= 1

    def latency(self, override: float | None) -> float:
        """Simulated generation time: the override if given, else seeded uniform draw."""
        if override is not None:
            return override
        return self._latency_rng.uniform(self.config.latency_min, self.config.latency_max)

    def garbage(self, size: int = 4096) -> bytes:
        """Random bytes that are no known media format (first byte is never a magic start)."""
        return b"\x00" + self._garbage_rng.randbytes(size - 1)

    def store_file(self, data: bytes, ext: str, content_type: str, base_url: str) -> str:
        """Keep ``data`` for ``GET /files/{name}`` (LRU bounded) and return its URL."""
        name = f"{uuid.uuid4().hex}.{ext}"
        self.files[name] = (data, content_type)
        while len(self.files) > self.config.file_cache_size:
            self.files.popitem(last=False)
        return f"{base_url}/files/{name}"

    def add_task(self, task: AsyncTask) -> None:
        """Remember an async task, forgetting the oldest beyond ``max_tasks``."""
        self.tasks[task.task_id] = task
        self.tasks_created += 1
        while len(self.tasks) > self.config.max_tasks:
            self.tasks.popitem(last=False)


STATE_KEY = web.AppKey("charai_emulator_state", EmulatorState)
