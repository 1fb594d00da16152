"""A fresh PostgreSQL database per run: on DATABASE_URL's server, else on an embedded server started here.

Either way the benchmark gets a DSN of its own, so it can query prefd's tables itself, and prefd gets
it as DATABASE_URL (prefd never starts or stops the server, so it can be restarted between rounds
without restarting PostgreSQL). The database is dropped, and an embedded server stopped and its
directory removed, at the end, even on error. Start it before pinning this process: an embedded
server inherits this process's CPUs and should stay unpinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from harness.progress import log


@dataclass(frozen=True)
class BenchDatabase:
    """The run's database: where it lives and the DSN for prefd and for this process."""

    mode: str  # "external" (DATABASE_URL's server) or "embedded" (pgserver started here)
    name: str
    dsn: str

    def describe(self) -> dict[str, str]:
        """The report's "database" section."""
        return {"mode": self.mode, "name": self.name}


def with_database(url: str, name: str) -> str:
    """`url` (a postgresql:// URL) pointing at database `name` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + name))


@contextlib.asynccontextmanager
async def _embedded_server() -> AsyncIterator[str]:
    """An embedded PostgreSQL (pgserver) in a temporary directory; yields its postgres-database URL."""
    from pgserver import get_server  # only embedded runs need it

    data_dir = Path(tempfile.mkdtemp(prefix="prefd-bench-pg-"))
    server: Any = None
    try:
        server = await asyncio.to_thread(get_server, data_dir / "pg", cleanup_mode="stop")
        log(f"embedded PostgreSQL started in {data_dir}")
        uri: str = server.get_uri()
        yield uri
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.cleanup)
        shutil.rmtree(data_dir, ignore_errors=True)
        log(f"embedded PostgreSQL stopped and {data_dir} removed")


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[BenchDatabase]:
    """A new, empty database ``prefd_bench_<random>`` for this run, dropped at the end."""
    async with contextlib.AsyncExitStack() as stack:
        server_url = os.environ.get("DATABASE_URL")
        mode = "external"
        if not server_url:
            server_url = await stack.enter_async_context(_embedded_server())
            mode = "embedded"
        name = f"prefd_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            log(f"created database {name} ({mode})")
            try:
                yield BenchDatabase(mode, name, with_database(server_url, name))
            finally:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                log(f"dropped database {name}")
        finally:
            await admin.close()
