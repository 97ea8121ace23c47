"""``python -m charai.task_store``"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: gRPC's transport is chosen at its import

# isort: split
from charai.core import lifecycle, logs, settings
from charai.task_store.app import serve
from charai.task_store.settings import Settings


def main() -> None:
    config = settings.load(Settings)
    logs.configure("task_store", config.log_level, config.log_format, secrets=config.secret_values())
    lifecycle.run(serve(config), config.event_loop, config.gc_threshold)


if __name__ == "__main__":
    main()
