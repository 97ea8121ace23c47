"""``python -m charai.task_store``"""

from __future__ import annotations

import asyncio

from charai.core import logs, settings
from charai.task_store.app import serve
from charai.task_store.settings import Settings


def main() -> None:
    config = settings.load(Settings)
    logs.configure("task_store", config.log_level, config.log_format)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
