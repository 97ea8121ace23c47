"""``python -m charai.webhook_sender``"""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: gRPC's transport is chosen at its import

# isort: split
from charai.core import lifecycle, logs, settings
from charai.webhook_sender.app import SenderApp, serve
from charai.webhook_sender.settings import SenderSettings


def main() -> None:
    config = settings.load(SenderSettings)
    logs.configure("webhook_sender", config.log_level, config.log_format, secrets=config.secret_values())
    lifecycle.run(serve(SenderApp(config)), config.event_loop, config.gc_threshold)


if __name__ == "__main__":
    main()
