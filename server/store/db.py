"""Connection pool, migrations and translation of database failures into domain errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import asyncpg

from server.errors import ConcurrentModification, DatabaseError, DatabaseUnavailable, PrefdError

log = logging.getLogger(__name__)

# pg_advisory_lock key that serialises migrations across replicas ("prefd" in ASCII).
MIGRATION_LOCK_KEY = 0x7072656664

Connection = asyncpg.Connection
Pool = asyncpg.Pool


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, min_size: int, max_size: int, statement_timeout_ms: int) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python values."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        server_settings={"statement_timeout": str(statement_timeout_ms), "application_name": "prefd"},
        command_timeout=max(statement_timeout_ms / 1000 + 5, 10) if statement_timeout_ms else None,
    )
    if pool is None:  # asyncpg types create_pool as Optional
        raise DatabaseUnavailable("could not create a connection pool")
    return pool


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One process's connection pool at a moment."""

    size: int
    in_use: int
    idle: int
    waiting: int
    min_size: int
    max_size: int


def pool_stats(pool: asyncpg.Pool) -> PoolStats:
    """The pool's figures. asyncpg has no public count of callers waiting in acquire(); it is the
    number of waiters on the pool's connection queue (an asyncio.Queue), read defensively."""
    size, idle = pool.get_size(), pool.get_idle_size()
    getters = getattr(getattr(pool, "_queue", None), "_getters", ())
    waiting = sum(1 for waiter in getters if not waiter.done())
    return PoolStats(size, size - idle, idle, waiting, pool.get_min_size(), pool.get_max_size())


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every bundled migration, in order."""
    found = []
    for entry in resources.files("server.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations under an advisory lock; returns the names applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration", extra={"migration": name})
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Turn asyncpg and connection failures into domain errors (never UNKNOWN)."""
    try:
        yield
    except PrefdError:
        raise
    except (
        OSError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.InterfaceError,
        TimeoutError,
    ) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError) as exc:
        raise ConcurrentModification("concurrent update; retry") from exc
    except asyncpg.PostgresError as exc:
        log.exception("database error")
        raise DatabaseError(f"database error {exc.sqlstate}") from exc
