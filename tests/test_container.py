"""Running prefd as replicas of one installation (the container's way): with DATABASE_URL a shared
signing key is required and no admin token is printed; the image declares its data volume and its
build context leaves out local state, tool caches and build output."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg

from tests.helpers.processes import ROOT
from tests.helpers.settings import SECRET


def _environment(**settings: str) -> dict[str, str]:
    """This process's environment without any signing key, plus `settings`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PREFD_JWT_")}
    return {**inherited, **settings}


async def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_a_database_url_without_a_signing_key_refuses_to_start(fresh_database: Any, tmp_path: Path) -> None:
    url = await fresh_database()
    env = _environment(DATABASE_URL=url, PREFD_PORT="0", PREFD_HOST="127.0.0.1", PREFD_DATA_DIR=str(tmp_path / "data"))
    for args in (("serve",), ("serve", "--workers", "2"), ("token", "--role", "admin", "--sub", "ops")):
        code, out = await _run(env, *args)
        assert code == 2, out
        [refusal] = [line for line in out.splitlines() if line.startswith("prefd: ")]
        assert refusal.startswith("prefd: PREFD_JWT_SECRET: not set while DATABASE_URL is")
        assert "PREFD_JWT_PUBLIC_KEY" in refusal
        assert "prefd serving" not in out and "Traceback" not in out and "eyJ" not in out
    # Nothing started: no secret of its own in the data directory, the database not even migrated.
    assert not (tmp_path / "data" / "jwt_secret").exists()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('changes')") is None
    finally:
        await conn.close()


async def test_with_a_database_url_no_admin_token_is_printed(fresh_database: Any, tmp_path: Path) -> None:
    url = await fresh_database()
    env = _environment(
        DATABASE_URL=url,
        PREFD_JWT_SECRET=SECRET,
        PREFD_PRINT_TOKEN="true",
        PREFD_PORT="0",
        PREFD_HOST="127.0.0.1",
        PREFD_DATA_DIR=str(tmp_path / "data"),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "serve",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = ""
    try:
        async with asyncio.timeout(60):
            while not re.search(r"^prefd serving on port \d+", output, re.MULTILINE):
                line = await process.stdout.readline()
                assert line, "prefd exited early:\n" + output
                output += line.decode()
            # Everything it prints from here to its exit: the quick start would come right after the port line.
            process.send_signal(signal.SIGTERM)
            output += (await process.stdout.read()).decode()
            assert await process.wait() == 0, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "PREFD_TOKEN" not in output and "grpcurl" not in output and "eyJ" not in output, output
    assert not (tmp_path / "data" / "jwt_secret").exists()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (or a folder above it) out of the build context."""
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        candidate = "/".join(parts[:depth])
        for pattern in patterns:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            # `**/` also matches no folder at all.
            if pattern.startswith("**/") and fnmatch.fnmatchcase(candidate, pattern[3:]):
                return True
    return False


def test_the_image_declares_its_data_volume_and_its_context_leaves_out_caches() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^VOLUME \["/var/lib/prefd"\]$', dockerfile, re.MULTILINE)
    assert re.search(r"^ENV PREFD_DATA_DIR=/var/lib/prefd\b", dockerfile, re.MULTILINE)
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for left_out in (
        ".git/HEAD",
        ".venv/bin/python",
        ".prefd/jwt_secret",
        ".ci/buf/bin/buf",
        ".mypy_cache/3.11/x.json",
        "clients/python/.mypy_cache/x",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/examples/x",
        "build/lib/prefd_server/app.py",
        "dist/prefd_server-0.1.0.whl",
        "clients/python/build/lib/prefd/__init__.py",
        "clients/node/node_modules/x/index.js",
        "prefd_server.egg-info/PKG-INFO",
        "clients/python/prefd_client.egg-info/PKG-INFO",
        "prefd_server/__pycache__/app.cpython-311.pyc",
    ):
        assert _ignored(left_out, patterns), left_out
    # What the Dockerfile copies stays in the context.
    for kept in (
        "pyproject.toml",
        "README.md",
        "prefd_server/app.py",
        "prefd_server/migrations",
        "clients/python/pyproject.toml",
    ):
        assert (ROOT / kept).exists() and not _ignored(kept, patterns), kept
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for source in copied.split():
            assert not _ignored(source, patterns), source
