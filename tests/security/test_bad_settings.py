"""A bad setting stops a process at start with a message naming the variable — and never echoes a
secret: each service's real ``python -m`` entry point, given bad values next to canary secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

CANARY = uuid.uuid4().hex


def start(module: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    full.update(CHARAI_DATA_DIR=str(tmp_path), CHARAI_IMAGE_API_KEY=f"sk-{CANARY}", **env)
    return subprocess.run(
        [sys.executable, "-m", module], env=full, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("module", "env", "named"),
    [
        ("charai.task_store", {"CHARAI_EVENT_LOOP": "trio"}, ["CHARAI_EVENT_LOOP='trio'"]),
        (
            "charai.task_store",
            {"CHARAI_TASK_STORE_ADDR": "127.0.0.1:1,127.0.0.1:2"},
            ["CHARAI_TASK_STORE_ADDR", "one HOST:PORT"],
        ),
        (
            "charai.gateway",
            {"CHARAI_GATEWAY_HTTP_ADDR": "0.0.0.0:0", "CHARAI_INTERNAL_TOKEN": f"internal-{CANARY}"},
            ["CHARAI_GATEWAY_HTTP_ADDR", "CHARAI_API_KEYS", "CHARAI_API_KEYS_FILE"],
        ),
        (
            "charai.gateway",
            {"CHARAI_API_KEYS": f"tok-{CANARY}", "CHARAI_MEDIA_SIGNING_KEY": f"signing-{CANARY}"},
            ["CHARAI_API_KEYS", "token=tenant"],
        ),
        ("charai.gateway", {"CHARAI_CORS_ORIGINS": "not an origin"}, ["CHARAI_CORS_ORIGINS"]),
        (  # the last entry silently won
            "charai.gateway",
            {"CHARAI_API_KEYS": f"dup-{CANARY}=alice,dup-{CANARY}=bob"},
            ["CHARAI_API_KEYS", "one token to two tenants"],
        ),
        (
            "charai.image_worker",
            # Another setting is bad; the URL (it may carry a password) is not shown either.
            {
                "CHARAI_NATS_URL": f"nats://u:{CANARY}@h:4222",
                "CHARAI_LOG_LEVEL": "nonsense",
                "CHARAI_EVENT_LOOP": "",
            },
            ["CHARAI_LOG_LEVEL='nonsense'"],
        ),
        ("charai.image_worker", {"CHARAI_NATS_URL": " , "}, ["CHARAI_NATS_URL"]),
        ("charai.tts_worker", {"CHARAI_TASK_STORE_ADDR": "nohost"}, ["CHARAI_TASK_STORE_ADDR='nohost'"]),
        # Values that passed and then crashed (exit code 1, a traceback, the variable unnamed).
        ("charai.task_store", {"CHARAI_TASK_STORE_ADDR": "127.0.0.1:٥٤٩٩٩"}, ["CHARAI_TASK_STORE_ADDR"]),
        ("charai.task_store", {"CHARAI_TASK_STORE_ADDR": "foo bar:80"}, ["CHARAI_TASK_STORE_ADDR"]),
        ("charai.task_store", {"CHARAI_RETENTION_DAYS": "inf"}, ["CHARAI_RETENTION_DAYS='inf'"]),
        ("charai.task_store", {"CHARAI_RETENTION_DAYS": "1e200"}, ["CHARAI_RETENTION_DAYS"]),
        ("charai.tts_worker", {"CHARAI_ACK_WAIT_SECONDS": "inf"}, ["CHARAI_ACK_WAIT_SECONDS"]),
        # JetStream refused the consumer, and the worker ran without one.
        ("charai.tts_worker", {"CHARAI_ACK_WAIT_SECONDS": "1e12"}, ["CHARAI_ACK_WAIT_SECONDS"]),
        ("charai.image_worker", {"CHARAI_MAX_DELIVER": "9" * 20}, ["CHARAI_MAX_DELIVER"]),
        ("charai.task_store", {"CHARAI_LOG_FORMAT": "xml"}, ["CHARAI_LOG_FORMAT='xml'"]),
        ("charai.webhook_sender", {"CHARAI_MEDIA_URL_TTL": "30"}, ["CHARAI_MEDIA_URL_TTL"]),
        (
            "charai.task_store",
            {"CHARAI_INTERNAL_TOKEN": f"two {CANARY} words"},
            ["CHARAI_INTERNAL_TOKEN", "without spaces"],
        ),
        # Checked after loading: exit code 2 as well (was 1).
        (
            "charai.task_store",
            {"CHARAI_TENANTS_FILE": "/nonexistent/tenants.toml"},
            ["CHARAI_TENANTS_FILE: cannot read"],
        ),
        (
            "charai.task_store",
            {"CHARAI_DATABASE_URL": f"mysql://u:{CANARY}@127.0.0.1:1/db"},
            ["CHARAI_DATABASE_URL"],
        ),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it_without_a_secret(
    tmp_path: Path, module: str, env: dict[str, str], named: list[str]
) -> None:
    done = start(module, tmp_path, **env)
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert "bad setting" in done.stderr
    for words in named:
        assert words in done.stderr, done.stderr
    assert CANARY not in done.stdout + done.stderr


def test_an_internal_token_from_a_file_loses_its_newline() -> None:
    # Kept, it was an illegal header value: every internal call failed (the gateway printed
    # "Illegal header value" 19 times and was NOT_SERVING), and a trailing space made
    # task_store refuse the token it was given.
    from charai.task_store.settings import Settings

    assert Settings(internal_token=f"{CANARY}\n").internal_token.get_secret_value() == CANARY  # type: ignore[arg-type]
    assert Settings(internal_token=f" {CANARY} ").internal_token.get_secret_value() == CANARY  # type: ignore[arg-type]
