"""Repository tooling: generated code is fresh, tools are pinned, the CLI mints tokens the server accepts."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import subprocess
import sys
import tomllib

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.processes import ROOT


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, "run `python scripts/generate.py`:\n" + result.stderr


async def test_cli_token_is_accepted(app: App, channel) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "token",
        "--role",
        "user",
        "--sub",
        "carol",
        "--org",
        "acme",
        env={"PREFD_JWT_SECRET": app.settings.jwt_secret or "", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id="carol"), key_prefixes=["locale."]
        ),
        metadata=(("authorization", f"Bearer {out.decode().strip()}"),),
    )
    assert [v.key for v in reply.values] == ["locale.language", "locale.timezone"]


async def test_healthcheck_command_reports_serving(app: App) -> None:
    ok = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "healthcheck",
        "--port",
        str(app.port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await ok.communicate()
    assert (ok.returncode, out.decode().strip()) == (0, "SERVING")
    down = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "healthcheck",
        "--port",
        "1",
        "--timeout",
        "1",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await down.communicate()
    assert down.returncode == 1 and "unhealthy" in err.decode()


def test_development_tools_are_pinned_exactly_and_installed_at_their_pins() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pins: dict[str, str] = {}
    for requirement in extras:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", requirement)
        assert match, f"{requirement!r} is not pinned exactly"
        pins[match[1]] = match[2]
    assert {"ruff", "mypy", "pytest", "grpcio-tools", "mypy-protobuf"} <= pins.keys()
    installed = {name: importlib.metadata.version(name) for name in pins}
    assert installed == pins, "run ./scripts/bootstrap (the venv predates the pins)"


def test_ci_pins_buf_exactly() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    (version,) = re.findall(r"^buf_version=(\S+)$", ci, flags=re.MULTILINE)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert '"@bufbuild/buf@$buf_version"' in ci
    assert not re.search(r"@bufbuild/buf@\d", ci)
