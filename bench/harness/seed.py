"""Rows written straight into a run's database, for benchmarks that need a large table to start from."""

from __future__ import annotations

import asyncpg

CHANGE_ROWS_BATCH = 20_000


async def seed_change_rows(dsn: str, rows: int) -> None:
    """Insert `rows` preference change rows (1,000 USER scopes bench-user-<n>, 50 keys each), then ANALYZE.

    Rows go in in transactions of CHANGE_ROWS_BATCH; inserting is what the append-only table allows.
    The actor is bench-admin.
    """
    conn = await asyncpg.connect(dsn)
    try:
        done = 0
        while done < rows:
            count = min(CHANGE_ROWS_BATCH, rows - done)
            await conn.execute(
                """INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version, actor)
                   SELECT 'preference', 'USER', 'bench-user-' || (n % 1000), 'display.key_' || (n / 1000 % 50),
                          to_jsonb(n - 1), to_jsonb(n), n / 50000 + 1, 'bench-admin'
                   FROM generate_series($1::bigint, $2::bigint) AS n""",
                done,
                done + count - 1,
            )
            done += count
        await conn.execute("ANALYZE changes")
    finally:
        await conn.close()
