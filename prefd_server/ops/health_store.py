"""The SQL behind the health checks: whether PostgreSQL answers, and how old its oldest writing transaction is."""

from __future__ import annotations

import asyncpg


async def select_one(pool: asyncpg.Pool) -> None:
    """Return once PostgreSQL answers a trivial query on a pooled connection."""
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def oldest_write_transaction_ms(pool: asyncpg.Pool) -> int:
    """How long the oldest transaction holding an xid has been open, in ms (0 when there is none)."""
    async with pool.acquire() as conn:
        age_ms: int = await conn.fetchval(
            """SELECT coalesce(extract(epoch FROM now() - min(xact_start)) * 1000, 0)::bigint
               FROM pg_stat_activity WHERE backend_xid IS NOT NULL"""
        )
    return age_ms
