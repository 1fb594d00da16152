"""The settings of the in-process test servers: signing secret, master key, database URLs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import asyncpg

from prefd_server.kernel.db import init_connection, migrate
from prefd_server.settings import Settings

SECRET = "test-signing-secret-" + "x" * 32
# The test servers' AES-GCM master key for API keys (32 bytes, base64url).
MASTER_KEY = "dGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzLWxvbmctLS0"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (works for host and unix-socket URLs)."""
    base, _, query = url.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


async def migrated_database(fresh_database: Any) -> str:
    """The URL of a new database (from the `fresh_database` fixture) with every migration applied."""
    url: str = await fresh_database()
    conn = await asyncpg.connect(url)
    try:
        await init_connection(conn)
        await migrate(conn)
    finally:
        await conn.close()
    return url


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for an in-process test server (REDIS_URL's Redis when set); overrides win."""
    defaults: dict[str, Any] = dict(
        database_url=database_url,
        redis_url=os.environ.get("REDIS_URL") or None,
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        jwt_secret=SECRET,
        grace_period_s=2,
        health_interval_s=0.2,
        health_timeout_s=0.5,
        print_token=False,
        watch_progress_interval_s=0.5,
        secret_key=MASTER_KEY,
    )
    return Settings(**{**defaults, **overrides})


def serve_env(database_url: str, port: int = 0, **extra: str) -> dict[str, str]:
    """The environment of a `prefd serve` child process on `database_url`: the tests' signing secret and
    loopback, everything else as prefd's defaults have it; `extra` adds or overrides variables."""
    return {
        "DATABASE_URL": database_url,
        "PREFD_JWT_SECRET": SECRET,
        "PREFD_PORT": str(port),
        "PREFD_HOST": "127.0.0.1",
        **extra,
    }


def process_env(database_url: str, port: int = 0, **extra: str) -> dict[str, str]:
    """serve_env with no printed token and warnings only; `extra` adds or overrides variables."""
    return serve_env(database_url, port, **{"PREFD_PRINT_TOKEN": "false", "PREFD_LOG_LEVEL": "WARNING", **extra})
