"""The last line of defence in every process's logging: the values of its secret settings are
scrubbed from every line, whatever field, message, exception or library logger carries them.

(The end-to-end canary run, test_secrets, shows the code never logs a secret in the first place;
this shows what happens if some day it does.)
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

from charai.core import logs
from charai.core.settings import CommonSettings
from charai.gateway.settings import Settings as GatewaySettings
from charai.task_store.settings import Settings as TaskStoreSettings
from charai.worker.settings import ImageWorkerSettings, TtsWorkerSettings
from pydantic import SecretStr


def test_secret_settings_are_found_in_the_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-token-123456=tenant-f\n")
    password_file = tmp_path / "pw"
    password_file.write_text("pg-password-123456\n")
    found = logs.secrets_from_env(
        {
            "CHARAI_IMAGE_API_KEY": "sk-image-123456",
            "CHARAI_TTS_API_KEY": "sk-tts-123456",
            "CHARAI_INTERNAL_TOKEN": "internal-123456",
            "CHARAI_MEDIA_SIGNING_KEY": "signing-123456",
            "CHARAI_API_KEYS": "tok-a-123456=tenant-a,tok-b-123456=tenant-b",
            "CHARAI_API_KEYS_FILE": str(keys_file),
            "CHARAI_DATABASE_PASSWORD_FILE": str(password_file),
            "CHARAI_TOKEN": "cli-token-123456",
            "CHARAI_IMAGE_MODEL": "glm-image",  # not a secret
            "CHARAI_TLS_KEY_FILE": str(tmp_path / "x.key"),  # a path; the key stays in its file
        }
    )
    assert {s.strip() for s in found} >= {
        "sk-image-123456",
        "sk-tts-123456",
        "internal-123456",
        "signing-123456",
        "tok-a-123456",
        "tok-b-123456",
        "file-token-123456",
        "pg-password-123456",
        "cli-token-123456",
    }
    assert "glm-image" not in found and "tenant-a" not in " ".join(found)


def test_registered_secrets_are_scrubbed_from_every_field_and_library_line() -> None:
    secret = f"sk-canary-{uuid.uuid4().hex}"
    logs.register_secrets([secret, "short"])  # too short to scrub safely: ignored
    event = logs.redact(
        None,
        "info",
        {
            "event": f"provider said: invalid key {secret}",
            "url": f"https://example.com/?key={secret}",
            "exception": f"Traceback ...\nValueError: {secret}",
            "details": {"nested": [secret]},
            "count": 3,
            "authorization": "Bearer whatever",
            "note": "a short word stays",
        },
    )
    assert secret not in repr(event)
    assert event["event"] == "provider said: invalid key [redacted]"
    assert event["authorization"] == "[redacted]" and event["count"] == 3
    assert event["note"] == "a short word stays"

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs._ScrubFilter())
    library = logging.getLogger(f"some.library.{uuid.uuid4().hex}")
    library.addHandler(handler)
    library.propagate = False
    try:
        library.warning("retrying with %s", secret)
        try:
            raise RuntimeError(f"boom {secret}")
        except RuntimeError:
            library.exception("failed")
    finally:
        library.removeHandler(handler)
    output = stream.getvalue()
    assert secret not in output and "retrying with [redacted]" in output and "boom [redacted]" in output


SETTINGS_CLASSES = (
    CommonSettings,
    GatewaySettings,
    TaskStoreSettings,
    ImageWorkerSettings,
    TtsWorkerSettings,
)


def test_every_secret_setting_is_a_secret_str() -> None:
    # A SecretStr prints as ********** (a settings object in a log or a traceback shows no
    # secret) and is what ``secret_values()`` hands to the scrubber.
    secretish = re.compile(r"key|token|secret|password")
    for cls in SETTINGS_CLASSES:
        for name, field in cls.model_fields.items():
            if secretish.search(name) and not name.endswith("_file") and field.annotation not in (int, float):
                # (a number such as CHARAI_ACCESS_TOKEN_MAX_TTL_SECONDS is a limit, not a secret)
                assert field.annotation is SecretStr, f"{cls.__name__}.{name} is not a SecretStr"


def test_the_loaded_settings_feed_the_scrubber(tmp_path: Path) -> None:
    """Each service's ``__main__`` gives ``logs.configure`` its settings' secret values,
    including those no variable name gives away: a password inside ``CHARAI_DATABASE_URL``, the
    tokens in the file ``CHARAI_API_KEYS_FILE`` names. It passes ``CHARAI_EVENT_LOOP`` on too."""
    canary = uuid.uuid4().hex
    keys = tmp_path / "keys"
    keys.write_text(f"file-token-{canary}=tenant-f\n")
    secrets = {
        "charai.task_store": f"pg-password-{canary}",
        "charai.gateway": f"file-token-{canary}",
        "charai.image_worker": f"sk-image-{canary}",
        "charai.tts_worker": f"internal-{canary}",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARAI_")}
    env.update(
        CHARAI_DATA_DIR=str(tmp_path),
        CHARAI_EVENT_LOOP="asyncio",
        CHARAI_DATABASE_URL=f"postgresql://charai:{secrets['charai.task_store']}@127.0.0.1:1/charai",
        CHARAI_API_KEYS_FILE=str(keys),
        CHARAI_IMAGE_API_KEY=secrets["charai.image_worker"],
        CHARAI_INTERNAL_TOKEN=secrets["charai.tts_worker"],
        CHARAI_LOG_LEVEL="info",
    )
    # The real main(), with the event loop's run replaced by a line that leaks every secret.
    program = """
import sys, runpy
from charai.core import lifecycle, logs
def leak(main, event_loop, gc_threshold=0):
    main.close()
    logs.get_logger().warning("oops", detail=sys.argv[1], loop=event_loop)
lifecycle.run = leak
runpy.run_module(sys.argv[2], run_name="__main__")
"""
    for module, secret in secrets.items():
        done = subprocess.run(
            [sys.executable, "-c", program, f"connect failed: {secret}", module],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        (line,) = [json.loads(raw) for raw in done.stdout.splitlines() if '"oops"' in raw]
        assert line["loop"] == "asyncio", line
        assert line["detail"] == "connect failed: [redacted]", (module, line)
        assert canary not in done.stdout + done.stderr, module
