"""compose.yaml and the Dockerfile agree with the code: settings, modules and build targets.

A misspelt ``CHARAI_*`` variable is silently ignored by the settings (``extra="ignore"``), so a
deployment would run on a default without anyone noticing; these checks catch that before CI's
``docker-compose config`` or a real start-up would. No Docker needed: the files are parsed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from charai.core.settings import CommonSettings
from charai.gateway.settings import Settings as GatewaySettings
from charai.task_store.settings import Settings as TaskStoreSettings
from charai.webhook_sender.settings import SenderSettings
from charai.worker.settings import ImageWorkerSettings, TtsWorkerSettings
from pydantic_settings import BaseSettings

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the dev group
    HAVE_YAML = False
else:
    HAVE_YAML = True

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

#: Build target (= ``charai.<target>`` module) -> the settings class that process reads.
SETTINGS_OF_TARGET: dict[str, type[BaseSettings] | None] = {
    "task_store": TaskStoreSettings,
    "gateway": GatewaySettings,
    "image_worker": ImageWorkerSettings,
    "tts_worker": TtsWorkerSettings,
    "webhook_sender": SenderSettings,
    "emulator": None,  # argparse, with two environment fallbacks (below)
}
EMULATOR_VARS = {"CHARAI_EMULATOR_ADDR", "CHARAI_EMULATOR_API_KEY"}


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    assert prefix == "CHARAI_"
    return {prefix + name.upper() for name in cls.model_fields}


def allowed_vars(target: str) -> set[str]:
    cls = SETTINGS_OF_TARGET[target]
    return EMULATOR_VARS if cls is None else env_names(cls)


SETTINGS_CLASSES = (
    CommonSettings,
    TaskStoreSettings,
    GatewaySettings,
    ImageWorkerSettings,
    TtsWorkerSettings,
    SenderSettings,
)
ALL_SETTINGS = set().union(*(env_names(cls) for cls in SETTINGS_CLASSES)) | EMULATOR_VARS


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    if not HAVE_YAML:
        pytest.fail(
            "PyYAML is not installed in the venv: add 'pyyaml' to [dependency-groups] dev in the root "
            "pyproject.toml (then uv lock) so tests/unit/test_compose.py can read compose.yaml",
            pytrace=False,
        )
    document = yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and `<<` merges
    return dict(document["services"])


def charai_services(services: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The services built from our Dockerfile: name -> (target, service)."""
    return {name: (svc["build"]["target"], svc) for name, svc in services.items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """What compose would substitute when only the required variables are set (to a dummy)."""

    def one(match: re.Match[str]) -> str:
        op, word = match.group(2) or "", match.group(3) or ""
        if op.endswith("?"):
            return "set-by-the-operator"
        return word if op.endswith("-") else ""

    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", one, value)


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions, with continuation lines joined as Docker does."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or (not pending and not raw.strip()):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        joined.append(pending + raw)
        pending = ""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in joined:
        match = re.match(r"(?i)^FROM\s+\S+\s+AS\s+(\S+)\s*$", line.strip())
        if match:
            current = stages.setdefault(match.group(1), [])
        elif re.match(r"(?i)^FROM\s", line.strip()):
            current = []
        else:
            current.append(line.strip())
    return stages


def test_compose_builds_every_target(services: dict[str, dict[str, Any]]) -> None:
    targets = {target for target, _ in charai_services(services).values()}
    assert targets == set(SETTINGS_OF_TARGET)


def test_every_charai_variable_is_a_setting_of_its_service(services: dict[str, dict[str, Any]]) -> None:
    wrong = [
        f"{name}: {var} is not a setting of charai.{target}"
        for name, (target, svc) in charai_services(services).items()
        for var in environment(svc)
        if var.startswith("CHARAI_") and var not in allowed_vars(target)
    ]
    assert not wrong, "\n".join(wrong)


def test_every_substituted_charai_variable_is_a_setting() -> None:
    # The operator's .env uses the settings' own names; a typo there would never reach a service.
    used = set(re.findall(r"\$\{(CHARAI_\w+)", COMPOSE.read_text()))
    assert used, "expected ${CHARAI_...} substitutions in compose.yaml"
    assert used <= ALL_SETTINGS, f"not settings: {sorted(used - ALL_SETTINGS)}"


def mounted_secrets(service: dict[str, Any]) -> dict[str, str]:
    """``/run/secrets/<name>`` → the file compose mounts there for ``service``: the operator's
    copy, or (in a checkout, where it is not made yet) the committed ``.example`` it is made from.
    Settings read such files (``CHARAI_API_KEYS_FILE``), so the example must be valid too."""
    assert HAVE_YAML
    declared = yaml.safe_load(COMPOSE.read_text()).get("secrets") or {}
    mounts: dict[str, str] = {}
    for entry in service.get("secrets") or []:
        name = entry if isinstance(entry, str) else entry["source"]
        source = ROOT / declared[name]["file"]
        if not source.exists():
            source = source.with_name(source.name + ".example")
        assert source.exists(), f"secret {name}: neither {declared[name]['file']} nor its .example"
        mounts[f"/run/secrets/{name}"] = str(source)
    return mounts


def test_each_service_environment_is_valid_for_its_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Types and bounds, with every default the operator may leave unset (e.g. a bool given "").
    for name, (target, svc) in charai_services(services).items():
        cls = SETTINGS_OF_TARGET[target]
        if cls is None:
            continue
        mounts = mounted_secrets(svc)
        with monkeypatch.context() as patch:
            for var in [v for v in os.environ if v.startswith("CHARAI_")]:
                patch.delenv(var)
            for var, raw in environment(svc).items():
                value = interpolate(raw)
                patch.setenv(var, mounts.get(value, value))
            try:
                cls()
            except ValueError as exc:  # pydantic's ValidationError: it names the bad variable
                pytest.fail(f"{name}: its environment does not validate as {cls.__name__}: {exc}")


def test_every_service_runs_a_module_that_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, (target, svc) in charai_services(services).items():
        assert importlib.util.find_spec(f"charai.{target}") is not None, f"{name}: no module charai.{target}"
        command = svc.get("command")
        if command:
            argv = command.split() if isinstance(command, str) else list(command)
            assert argv[:2] == ["python", "-m"], f"{name}: command must be python -m MODULE"
            assert importlib.util.find_spec(argv[2]) is not None, f"{name}: no module {argv[2]}"


def test_each_compose_target_exists_in_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    stages = dockerfile_stages()
    for name, (target, _) in charai_services(services).items():
        assert target in stages, f"{name}: Dockerfile has no stage `AS {target}`"


def test_each_target_runs_its_own_module() -> None:
    stages = dockerfile_stages()
    for target in SETTINGS_OF_TARGET:
        cmds = [line for line in stages[target] if line.upper().startswith("CMD ")]
        assert cmds, f"stage {target} has no CMD"
        assert json.loads(cmds[-1][4:]) == ["python", "-m", f"charai.{target}"]
        healthchecks = [line for line in stages[target] if line.upper().startswith("HEALTHCHECK ")]
        assert healthchecks, f"stage {target} has no HEALTHCHECK"
        json.loads(healthchecks[-1].split(" CMD ", 1)[1])  # exec form: valid JSON after joining


def test_published_ports_are_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
