"""Session fixtures: a fresh PostgreSQL database, a real prefd server on port 0, real gRPC channels."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest

from prefd.v1 import ai_config_pb2_grpc, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.db import init_connection
from tests.helpers.settings import make_settings, with_database


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
        return with_database(server_url, name)

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
