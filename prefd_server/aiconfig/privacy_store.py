"""SQL of a user's export and erasure over AI tables: configs, the usage ledger and its totals."""

from __future__ import annotations

from typing import Any

import asyncpg

from prefd_server.kernel.privacy import pseudonymise, rows_affected


async def user_usage(conn: asyncpg.Connection, user_id: str) -> list[dict[str, Any]]:
    """The user's usage ledger rows as JSON documents, oldest first."""
    rows = await conn.fetch(
        """SELECT request_id, org_id, model, input_tokens, output_tokens, cost_nanos, recorded_at
           FROM ai_usage WHERE user_id = $1 ORDER BY id""",
        user_id,
    )
    return [{**dict(row), "recorded_at": row["recorded_at"].isoformat()} for row in rows]


async def delete_user_configs(conn: asyncpg.Connection, user_id: str) -> int:
    """Delete the configs at the user's scope (their sealed keys go with them); returns how many."""
    return rows_affected(
        await conn.execute("DELETE FROM ai_configs WHERE scope_kind = 'USER' AND scope_id = $1", user_id)
    )


async def pseudonymise_user(conn: asyncpg.Connection, user_id: str, pseudonym: str) -> int:
    """Put the pseudonym where the user is recorded (writer, usage ledger) and drop their usage totals."""
    statements = (
        "UPDATE ai_configs SET created_by = $2 WHERE created_by = $1",
        "UPDATE ai_configs SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE ai_models SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE ai_usage SET user_id = $2 WHERE user_id = $1",
        "UPDATE ai_usage SET actor = $2 WHERE actor = $1",
    )
    rows = await pseudonymise(conn, statements, user_id, pseudonym)
    # Totals are derived from the ledger; the pseudonym's own rows stay as they were.
    return rows + rows_affected(await conn.execute("DELETE FROM ai_usage_totals WHERE user_id = $1", user_id))
