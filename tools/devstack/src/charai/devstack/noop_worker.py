"""``python -m charai.devstack.noop_worker``: a TTS worker whose handler does nothing.

What it is for: measuring the queue itself, as ``make bench`` does in B2 beside BullMQ's and
Celery's empty job functions. Everything but the handler is the TTS worker's own: JetStream
pulls, claims fenced by task_store, leases, the outcome recorded before the message is
acknowledged, events. The handler returns at once with a result that names the line and no audio:
no provider call, no media object. So the provider's credential is never verified by a call, and
the worker's per-process gate is used (``CHARAI_PROVIDER_SHARED_LIMITS`` is forced off): an
unverified shared credential would hold it to one job at a time and a few claimed ahead (README,
"Providers are shared").

Not for production: a task it runs completes without audio.
"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: gRPC's transport is chosen at its import

# isort: split
from charai.core import lifecycle, logs, settings
from charai.tasks.v1 import task_pb2
from charai.tts_worker.app import build
from charai.worker.app import serve
from charai.worker.context import JobContext
from charai.worker.settings import TtsWorkerSettings


class NoopHandler:
    """Ends every TTS job at once: its result carries the line's text, no audio."""

    kind = "tts"

    async def run(self, ctx: JobContext) -> task_pb2.TtsResult:
        return task_pb2.TtsResult(text=ctx.task.tts.text)


def main() -> None:
    config = settings.load(TtsWorkerSettings).model_copy(update={"provider_shared_limits": False})
    logs.configure("noop_worker", config.log_level, config.log_format, secrets=config.secret_values())
    lifecycle.run(serve(build(config, NoopHandler())), config.event_loop, config.gc_threshold)


if __name__ == "__main__":
    main()
