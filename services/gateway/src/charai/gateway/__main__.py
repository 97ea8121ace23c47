"""``python -m charai.gateway``"""

from __future__ import annotations

from charai.core import lifecycle, logs, settings
from charai.gateway.app import serve
from charai.gateway.settings import Settings


def main() -> None:
    config = settings.load(Settings)
    logs.configure("gateway", config.log_level, config.log_format, secrets=config.secret_values())
    lifecycle.run(serve(config), config.event_loop)


if __name__ == "__main__":
    main()
