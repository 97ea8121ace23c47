"""The task console in a real browser: headless Chromium (Debian's ``chromium``) driven by
``playwright-core`` opens the page the gateway serves at ``/``, which talks gRPC-web to the same
origin through the TypeScript client.

The Node script (``clients/console/e2e/console.mjs``) submits an image and a voice, sees the
progress bar climb live to 100 %, the image decode (``naturalWidth > 0``) and the audio load,
cancels a running task from its card, gets a rejected request explained field by field, reloads
to see the list again, and closes the tab; the gateway's ``open_watch_streams`` shows that each
closed page released its stream at once. The screenshot is kept in ``test-artifacts/console.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from charai.devstack.stack import ALL_SERVICES, Stack

from .conftest import fast_stack

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "clients/console"
CONSOLE_DIST = ROOT / "services/gateway/src/charai/gateway/console_dist"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")


#: Every task of the page gets the tenant's default webhook, to a port nobody listens on: each
#: delivery fails after one attempt, and the console lists it with a Redeliver button.
WEBHOOKS = {
    "CHARAI_TENANT_WEBHOOKS": "default=http://127.0.0.1:9/refused",
    "CHARAI_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
    "CHARAI_WEBHOOK_RETRY_SCHEDULE": "0",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with fast_stack(tmp_path_factory, ALL_SERVICES, env=WEBHOOKS) as running:
        yield running


def prepare() -> Path:
    """Checks what ``make test`` installs and builds; returns where the screenshot goes."""
    assert CHROMIUM.exists(), "no /usr/bin/chromium: 'make test' installs Debian's chromium"
    assert (CONSOLE_DIST / "index.html").exists(), "the console is not built: run 'make console'"
    assert (CONSOLE / "node_modules/playwright-core").exists(), "run 'make node'"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # artifacts are never committed
    screenshot = ARTIFACTS / "console.png"
    screenshot.unlink(missing_ok=True)
    return screenshot


async def test_console_in_headless_chromium(stack: Stack) -> None:
    screenshot = prepare()

    proc = await asyncio.create_subprocess_exec(
        "node", "e2e/console.mjs",
        cwd=CONSOLE,
        env={
            **os.environ,
            "CHARAI_HTTP_URL": stack.gateway_http,
            "SCREENSHOT": str(screenshot),
            "CHROMIUM": str(CHROMIUM),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = out.decode().strip().splitlines()
    assert lines, f"the browser script printed nothing; stderr:\n{err.decode()[-4000:]}"
    seen = json.loads(lines[-1])
    assert proc.returncode == 0, (
        f"{seen.get('error')}\nproblems: {seen.get('problems')}\n{err.decode()[-3000:]}"
    )

    # What the page showed, as the script measured it.
    assert seen["imageNaturalWidth"] == 1024
    assert seen["audioDuration"] > 0
    assert seen["progress"][-1] == 100
    assert len({p for p in seen["progress"] if 0 < p < 100}) >= 3, seen["progress"]
    assert "image.prompt" in seen["errorBanner"]
    assert seen["connection"] == "live"
    assert seen["problems"] == []
    # The webhook panel: the tasks' failed deliveries (no answer), one queued again.
    assert seen["webhookRows"] >= 1 and seen["webhookAttempts"].startswith("none"), seen
    # A reloaded or closed tab releases its watch stream on the gateway at once.
    assert seen["openWatchStreams"] == 1
    assert seen["openWatchStreamsAfterClose"] == 0
    data = await asyncio.to_thread(screenshot.read_bytes)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
