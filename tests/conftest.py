"""Session fixtures: a fresh PostgreSQL database, a real prefd server on port 0, real gRPC channels."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from prefd.v1 import ai_config_pb2_grpc, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.db import init_connection
from prefd_server.rpc.auth import mint_token
from prefd_server.settings import Settings

SECRET = "test-signing-secret-" + "x" * 32
# The test servers' AES-GCM master key for API keys (32 bytes, base64url).
MASTER_KEY = "dGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzLWxvbmctLS0"


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (works for host and unix-socket URLs)."""
    base, _, query = url.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL of a PostgreSQL server: DATABASE_URL's, else an embedded one started for this run."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
async def fresh_database(server_url: str) -> AsyncIterator[Any]:
    """A factory of empty databases on the test server, all dropped at the end of the run."""
    created: list[str] = []

    async def make() -> str:
        name = f"prefd_test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return _with_database(server_url, name)

    yield make
    conn = await asyncpg.connect(server_url)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(fresh_database: Any) -> str:
    """The database the shared test server runs on."""
    url: str = await fresh_database()
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


@pytest.fixture(scope="session")
async def app(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A prefd server on a random port, shared by the whole run."""
    async with App(make_settings(database_url, tmp_path_factory.mktemp("data"))) as running:
        yield running


@pytest.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> preferences_pb2_grpc.PreferencesServiceStub:
    return preferences_pb2_grpc.PreferencesServiceStub(channel)


@pytest.fixture(scope="session")
def ai_stub(channel: grpc.aio.Channel) -> ai_config_pb2_grpc.AIConfigServiceStub:
    return ai_config_pb2_grpc.AIConfigServiceStub(channel)


@pytest.fixture
async def db(app: App) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the server's database, for checking what was (not) written."""
    conn = await asyncpg.connect(app.dsn)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


def token(
    role: str = "admin",
    sub: str = "ops",
    org: str = "",
    ttl_s: int = 600,
    secret: str = SECRET,
    permissions: tuple[str, ...] = (),
) -> str:
    return mint_token(secret, sub, [role], org=org, ttl_s=ttl_s, permissions=list(permissions))


def auth(
    role: str = "admin", sub: str = "ops", org: str = "", permissions: tuple[str, ...] = ()
) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token(role, sub, org, permissions=permissions)}"),)


def unique(prefix: str = "t") -> str:
    """An id no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"
