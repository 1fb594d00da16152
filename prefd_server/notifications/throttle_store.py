"""Throttle counters in PostgreSQL: exact, shared charges per user, event type and window, for when Redis is not there.

A charge without an idempotency key is one statement: an upsert of the window's row that raises the
count only while it is below the limit; PostgreSQL's row lock on the conflicting row makes concurrent
charges from every process queue, so no more than `limit` are allowed. With a key, one READ COMMITTED
transaction first claims the key (an upsert on the charge row, which makes a concurrent retry of the
same key wait for this transaction and then read its outcome), then charges and records the outcome.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.privacy import rows_affected
from prefd_server.kernel.redis import ChargeOutcome

# An outcome not yet recorded: the charge row was claimed by the transaction reading it.
_UNRECORDED = -1
# Rows removed per table by one purge (the next one removes more).
PURGE_BATCH = 5000

_CLAIM = """
INSERT INTO notification_throttle_charges AS c
    (user_id, event_type, idempotency_key, allowed, count, charged_limit)
VALUES ($1, $2, $3, false, -1, $4)
ON CONFLICT (user_id, event_type, idempotency_key) DO UPDATE SET
    count = CASE WHEN c.created_at < now() - interval '24 hours' THEN -1 ELSE c.count END,
    charged_limit = CASE WHEN c.created_at < now() - interval '24 hours' THEN $4 ELSE c.charged_limit END,
    created_at = CASE WHEN c.created_at < now() - interval '24 hours' THEN now() ELSE c.created_at END
RETURNING allowed, count, charged_limit"""

# $6: the claimed idempotency key ('' records nothing).
_CHARGE = """
WITH counted AS (
    INSERT INTO notification_throttles AS t (user_id, event_type, window_start, window_end, count)
    VALUES ($1, $2, $3, $4, 1)
    ON CONFLICT (user_id, event_type, window_start) DO UPDATE SET count = t.count + 1 WHERE t.count < $5
    RETURNING count
), outcome AS (
    SELECT EXISTS (SELECT FROM counted) AS allowed, coalesce((SELECT count FROM counted), $5) AS count
), recorded AS (
    UPDATE notification_throttle_charges c SET allowed = o.allowed, count = o.count, charged_limit = $5
    FROM outcome o
    WHERE c.user_id = $1 AND c.event_type = $2 AND c.idempotency_key = $6
)
SELECT allowed, count FROM outcome"""


async def charge(
    pool: asyncpg.Pool,
    user_id: str,
    event_type: str,
    window: tuple[datetime, datetime],
    limit: int,
    idempotency_key: str = "",
) -> ChargeOutcome:
    """Count one use in `window` (start, end) if below `limit`; a key charged in the last 24 h returns
    its first outcome. A denied charge reports the limit as its count."""
    start, end = window
    async with translated_errors(), pool.acquire() as conn:
        if not idempotency_key:
            row = await conn.fetchrow(_CHARGE, user_id, event_type, start, end, limit, "")
            return ChargeOutcome(row["allowed"], row["count"], limit)
        async with conn.transaction(isolation="read_committed"):
            claim = await conn.fetchrow(_CLAIM, user_id, event_type, idempotency_key, limit)
            if claim["count"] != _UNRECORDED:
                return ChargeOutcome(claim["allowed"], claim["count"], claim["charged_limit"])
            row = await conn.fetchrow(_CHARGE, user_id, event_type, start, end, limit, idempotency_key)
            return ChargeOutcome(row["allowed"], row["count"], limit)


async def count_in(pool: asyncpg.Pool, user_id: str, event_type: str, window_start: datetime) -> int:
    """How often the user's event type was charged in the window starting at `window_start`."""
    async with translated_errors(), pool.acquire() as conn:
        count = await conn.fetchval(
            """SELECT count FROM notification_throttles
               WHERE user_id = $1 AND event_type = $2 AND window_start = $3""",
            user_id,
            event_type,
            window_start,
        )
    return int(count or 0)


async def purge_expired(pool: asyncpg.Pool) -> int:
    """Delete (a batch of) windows that ended and charges made more than 24 h ago; the rows removed."""
    async with translated_errors(), pool.acquire() as conn:
        windows = await conn.execute(
            """DELETE FROM notification_throttles WHERE ctid IN (
                   SELECT ctid FROM notification_throttles
                   WHERE window_end < now() - interval '24 hours' LIMIT $1)""",
            PURGE_BATCH,
        )
        charges = await conn.execute(
            """DELETE FROM notification_throttle_charges WHERE ctid IN (
                   SELECT ctid FROM notification_throttle_charges
                   WHERE created_at < now() - interval '24 hours' LIMIT $1)""",
            PURGE_BATCH,
        )
    return rows_affected(windows) + rows_affected(charges)


async def delete_user_throttles(conn: asyncpg.Connection, user_id: str) -> int:
    """Delete every throttle window and charge of the user (erasure), on `conn`; the rows removed."""
    windows = await conn.execute("DELETE FROM notification_throttles WHERE user_id = $1", user_id)
    charges = await conn.execute("DELETE FROM notification_throttle_charges WHERE user_id = $1", user_id)
    return rows_affected(windows) + rows_affected(charges)
