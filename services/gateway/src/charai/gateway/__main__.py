"""``python -m charai.gateway``: one gateway process, or (``CHARAI_GATEWAY_PROCESSES`` > 1) the
parent of several (:mod:`charai.gateway.processes`), which starts each as
``python -m charai.gateway --process I --ready-fd FD``."""

from __future__ import annotations

from charai.core import grpcenv  # noqa: F401  first: gRPC's transport is chosen at its import

# isort: split
import argparse
import sys

import structlog
from charai.core import lifecycle, logs, settings
from charai.gateway.app import serve
from charai.gateway.processes import ProcessGroup
from charai.gateway.settings import Settings


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m charai.gateway", description="charai's public gateway")
    # Given by the parent to the processes it starts, not by people.
    parser.add_argument("--process", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    # Anything else is ignored, as it was before these options (and as every other service does).
    return parser.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    config = settings.load(Settings)
    logs.configure("gateway", config.log_level, config.log_format, secrets=config.secret_values())
    if args.process is not None:
        structlog.contextvars.bind_contextvars(gateway_process=args.process)
        lifecycle.run(serve(config, args.process, args.ready_fd), config.event_loop, config.gc_threshold)
    elif config.gateway_processes > 1:
        sys.exit(lifecycle.run(ProcessGroup(config).run(), config.event_loop, config.gc_threshold))
    else:
        lifecycle.run(serve(config), config.event_loop, config.gc_threshold)


if __name__ == "__main__":
    main()
