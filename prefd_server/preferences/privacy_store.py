"""SQL of a user's erasure over preference tables: their overrides, and their id as a writer."""

from __future__ import annotations

import asyncpg

from prefd_server.kernel.privacy import pseudonymise, rows_affected


async def delete_user_values(conn: asyncpg.Connection, user_id: str) -> int:
    """Delete every value row at the user's scope; returns how many were live overrides."""
    live = rows_affected(
        await conn.execute(
            "DELETE FROM preference_values WHERE scope_kind = 'USER' AND scope_id = $1 AND value IS NOT NULL", user_id
        )
    )
    await conn.execute("DELETE FROM preference_values WHERE scope_kind = 'USER' AND scope_id = $1", user_id)
    return live


async def pseudonymise_writer(conn: asyncpg.Connection, user_id: str, pseudonym: str) -> int:
    """Put the pseudonym where the user is recorded as the last writer of a value or definition."""
    statements = (
        "UPDATE preference_values SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE definitions SET updated_by = $2 WHERE updated_by = $1",
    )
    return await pseudonymise(conn, statements, user_id, pseudonym)
