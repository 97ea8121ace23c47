"""``python -m charai.gateway``"""

from __future__ import annotations

import asyncio

from charai.core import logs, settings
from charai.gateway.app import serve
from charai.gateway.settings import Settings


def main() -> None:
    config = settings.load(Settings)
    logs.configure("gateway", config.log_level, config.log_format)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
