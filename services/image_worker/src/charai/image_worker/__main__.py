"""``python -m charai.image_worker``"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: gRPC's transport is chosen at its import

# isort: split
from charai.core import lifecycle, logs, settings
from charai.image_worker.app import build
from charai.worker.app import serve
from charai.worker.settings import ImageWorkerSettings


def main() -> None:
    config = settings.load(ImageWorkerSettings)
    logs.configure("image_worker", config.log_level, config.log_format, secrets=config.secret_values())
    lifecycle.run(serve(build(config)), config.event_loop, config.gc_threshold)


if __name__ == "__main__":
    main()
