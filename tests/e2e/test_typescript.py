"""The TypeScript client (``clients/typescript``) and the official ``grpc-web`` runtime, from Node,
against the real stack over gRPC-web: ``node --test`` in the package, with CHARAI_HTTP_URL set.

What the Node tests cover (``clients/typescript/test``): the seed's ``characterTasksApi`` calls
(submit image and voice, follow to the end with increasing progress, list a character's tasks),
INVALID_ARGUMENT with ``google.rpc.BadRequest`` details, aborting streams mid-way until the
gateway's ``open_watch_streams`` is back to 0, resuming dropped connections through a TCP proxy
that cuts them (nothing lost, nothing repeated), and the ``grpc-web`` runtime in text mode (a
stream of many events decoded chunk by chunk, an error with details) and binary mode.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from charai.devstack.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients/typescript"


async def test_node_tests_of_the_typescript_client_pass(stack: Stack) -> None:
    assert (PACKAGE / "dist/index.js").exists(), "the client is not built: run 'make ts' (make test does)"
    tests = sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "test").glob("*.test.js"))
    assert len(tests) >= 2, tests
    proc = await asyncio.create_subprocess_exec(
        "node", "--test", "--test-reporter=tap", "--test-concurrency=1", *tests,
        cwd=PACKAGE,
        env={**os.environ, "CHARAI_HTTP_URL": stack.gateway_http},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    report = out.decode()
    failed = [line for line in report.splitlines() if line.startswith("not ok")]
    assert proc.returncode == 0 and not failed, f"node --test failed: {failed}\n{report[-8000:]}"
    passed = re.search(r"^# pass (\d+)$", report, re.MULTILINE)
    assert passed is not None, report[-3000:]
    assert int(passed.group(1)) >= 8, report[-3000:]
    assert re.search(r"^# (fail|cancelled|skipped|todo) [1-9]", report, re.MULTILINE) is None, report[-3000:]
