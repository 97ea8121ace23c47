"""charai's services choose gRPC's transport before ``grpc`` is imported (``charai.core.grpcenv``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from charai.core import grpcenv

SERVICES = ["gateway", "task_store", "image_worker", "tts_worker", "webhook_sender"]

# Imports a service's entry module (not run: __name__ is not "__main__") in a fresh interpreter and
# records GRPC_EXPERIMENTS as it was when something first imported grpc.
PROBE = """
import importlib.abc, json, os, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "grpc" not in seen:
            seen["grpc"] = os.environ.get("GRPC_EXPERIMENTS")
        return None
sys.meta_path.insert(0, Probe())
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env.update(extra)
    return env


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_sets_grpcs_transport_before_grpc_is_imported(service: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, f"charai.{service}.__main__"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"grpc": grpcenv.DEFAULT}


def test_a_setting_of_the_operator_is_kept_even_empty() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "charai.task_store.__main__"],
        env=_clean_env(GRPC_EXPERIMENTS=""),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"grpc": ""}


def test_apply_sets_the_default_only_when_unset() -> None:
    assert grpcenv.apply({}) == grpcenv.DEFAULT
    mine = {"GRPC_EXPERIMENTS": "-event_engine_listener"}
    assert grpcenv.apply(mine) == "-event_engine_listener"
    assert mine == {"GRPC_EXPERIMENTS": "-event_engine_listener"}
