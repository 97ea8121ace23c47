"""The last line of defence in every process's logging: the values of its secret settings are
scrubbed from every line, whatever field, message, exception or library logger carries them.

(The end-to-end canary run, test_secrets, shows the code never logs a secret in the first place;
this shows what happens if some day it does.)
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path

from charai.core import logs


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
