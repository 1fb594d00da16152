"""Migrations: idempotent, and safe when several processes run them at once."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from prefd_server.kernel.db import migrate, migration_files
from tests.helpers.processes import ROOT


async def test_migrate_twice_applies_nothing_the_second_time(fresh_database) -> None:
    conn = await asyncpg.connect(await fresh_database())
    try:
        first = await migrate(conn)
        assert first == [name for _, name, _ in migration_files()]
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(first)
    finally:
        await conn.close()


async def test_concurrent_migrate_processes_do_not_race(fresh_database) -> None:
    url = await fresh_database()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "prefd_server",
            "migrate",
            env={**os.environ, "DATABASE_URL": url},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0] * 4, [o[0].decode()[-2000:] for o in outputs]
    applied = [o[0].decode().strip().splitlines()[-1] for o in outputs]
    assert sum(line != "applied: nothing (up to date)" for line in applied) == 1, applied
    conn = await asyncpg.connect(url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [v for v, _, _ in migration_files()]
        assert await conn.fetchval("SELECT count(*) FROM installation") == 1
    finally:
        await conn.close()
