"""gRPC's transport for charai's processes, chosen before anything imports ``grpc``.

gRPC reads ``GRPC_EXPERIMENTS`` once, when the ``grpc`` package is first imported, so each
service's ``__main__`` imports this module first (an import for its effect): unless
``GRPC_EXPERIMENTS`` is set already, it turns off gRPC's EventEngine for listening and for client
connections, so both use gRPC's older POSIX TCP code (grpcio 1.85 still ships it, tested and
supported). Every hop of a task pays less for it: on 2 cores, sequential calls over loopback cost
the server 18 % less CPU per unary call and ~30 % less per bidi stream message (the store's
``ExchangeStream``), the client ~20 % less (README, "Operate and scale", has the numbers and the command).

``GRPC_EXPERIMENTS`` set to anything, even empty, is left as it is: ``GRPC_EXPERIMENTS=`` runs
gRPC's defaults. This module imports nothing but ``os``.
"""

from __future__ import annotations

import os

#: What charai sets ``GRPC_EXPERIMENTS`` to when it is not set.
DEFAULT = "-event_engine_listener,-event_engine_client"


def apply(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Sets ``GRPC_EXPERIMENTS`` to :data:`DEFAULT` unless it is set; returns its value."""
    return environ.setdefault("GRPC_EXPERIMENTS", DEFAULT)


apply()
