"""The README's grpcurl examples work as printed (against the test server's port)."""

from __future__ import annotations

import asyncio
import os
import sys

from prefd_server.app import App
from tests.helpers.auth import token
from tests.helpers.processes import ROOT


async def test_readme_grpcurl_examples_succeed(app: App) -> None:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("grpcurl ")]
    assert len(lines) >= 6
    env = {
        **os.environ,
        "PREFD_TOKEN": token("admin"),
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    for line in lines:
        command = line.replace("localhost:50051", f"127.0.0.1:{app.port}")
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        if "WatchPreferences" in line:
            # A watch streams until cancelled: read its first message, then stop it.
            assert proc.stdout is not None
            async with asyncio.timeout(10):
                first = await proc.stdout.readuntil(b"}\n}")
            assert b'"started"' in first, line
            proc.kill()
            await proc.wait()
            continue
        out, err = await proc.communicate()
        assert proc.returncode == 0, f"{line}\n{err.decode()}"
        assert out.strip(), line
