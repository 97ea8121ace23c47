"""Settings every service reads (``charai.core.settings.CommonSettings``): values that used to
pass and fail later, and what a refusal shows of a value."""

from __future__ import annotations

from pathlib import Path

import pytest
from charai.core import settings
from charai.gateway.settings import Settings

from tests.unit.test_lifecycle import _refused


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHARAI_DATA_DIR", "CHARAI_MEDIA_URL_TTL", "CHARAI_NATS_URL"):
        monkeypatch.delenv(name, raising=False)


def test_a_data_dir_that_is_a_file_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # It used to pass, and the first mkdir under it failed with FileExistsError and a traceback.
    afile = tmp_path / "data"
    afile.write_text("not a directory")
    err = _refused(monkeypatch, capsys, "CHARAI_DATA_DIR", str(afile), Settings)
    assert "CHARAI_DATA_DIR=" in err and "must be a directory" in err
    monkeypatch.setenv("CHARAI_DATA_DIR", str(tmp_path / "new"))  # one that does not exist yet is made later
    assert settings.load(Settings).data_dir == tmp_path / "new"


def test_a_refused_duration_is_shown_but_a_url_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # CHARAI_MEDIA_URL_TTL holds "URL" in its name and was shown as <hidden>.
    err = _refused(monkeypatch, capsys, "CHARAI_MEDIA_URL_TTL", "soon", Settings)
    assert "CHARAI_MEDIA_URL_TTL='soon'" in err
    monkeypatch.delenv("CHARAI_MEDIA_URL_TTL")
    err = _refused(monkeypatch, capsys, "CHARAI_NATS_URL", " , ", Settings)
    assert "CHARAI_NATS_URL=<hidden>" in err
