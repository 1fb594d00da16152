"""`prefd rotate-master-key`: every stored API key is re-encrypted under the new master key."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc
from prefd_server.aiconfig.secretbox import encode_key, key_id
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.processes import ROOT
from tests.helpers.settings import make_settings

READER = ("ai:secrets:read",)


async def _prefd(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _key_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {row["key_id"] for row in await conn.fetch("SELECT key_id FROM ai_api_keys")}
    finally:
        await conn.close()


async def test_rotation_reencrypts_every_key_and_the_new_key_alone_reads_them(
    fresh_database: Any, tmp_path: Path
) -> None:
    dsn = await fresh_database()
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    plaintexts = {f"sk-{unique('k')}-{i}" for i in range(3)}
    created = []
    async with App(make_settings(dsn, tmp_path / "a", secret_key=encode_key(old))) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            ai = ai_config_pb2_grpc.AIConfigServiceStub(channel)
            for i, key in enumerate(sorted(plaintexts)):
                config = ai_config_pb2.AIConfig(name=f"c{i}", org_id=unique("org"), active=True)
                config.configuration.api_keys.primary = key
                response = await ai.CreateAIConfig(ai_config_pb2.CreateAIConfigRequest(config=config), metadata=auth())
                created.append((response.config.id, key))
    assert await _key_ids(dsn) == {key_id(old)}

    # The operator deploys the new key first, the old one after it, then rotates.
    env = {"DATABASE_URL": dsn, "PREFD_SECRET_KEY": f"{encode_key(new)},{encode_key(old)}"}
    code, out = await _prefd(env, "rotate-master-key")
    assert code == 0, out
    assert f"re-encrypted 3 API keys under master key {key_id(new)}" in out
    assert await _key_ids(dsn) == {key_id(new)}

    # Running it again finds nothing to do.
    code, out = await _prefd(env, "rotate-master-key")
    assert code == 0 and "re-encrypted 0 API keys" in out and "(3 already were)" in out

    async with App(make_settings(dsn, tmp_path / "b", secret_key=encode_key(new))) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            ai = ai_config_pb2_grpc.AIConfigServiceStub(channel)
            for config_id, key in created:
                response = await ai.GetAIConfig(
                    ai_config_pb2.GetAIConfigRequest(id=config_id),
                    metadata=auth("service", "gen", permissions=READER),
                )
                assert response.config.configuration.api_keys.primary == key


async def test_rotation_without_a_master_key_is_refused(fresh_database: Any) -> None:
    dsn = await fresh_database()
    code, out = await _prefd({"DATABASE_URL": dsn}, "rotate-master-key")
    assert code == 2
    assert "no master key configured" in out
