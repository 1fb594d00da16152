"""SQL of a user's export and erasure over the consent ledger."""

from __future__ import annotations

from typing import Any

import asyncpg

from prefd_server.kernel.privacy import rows_affected

_ENTRY_COLUMNS = """id, purpose, legal_basis, status, source, notice_version, proof_reference, granted_at,
    expires_at, withdrawn_at, actor, peer, user_agent, recorded_at"""
_TIMES = ("granted_at", "expires_at", "withdrawn_at", "recorded_at")


async def user_ledger(conn: asyncpg.Connection, user_id: str) -> list[dict[str, Any]]:
    """The user's ledger entries as JSON documents, oldest first."""
    rows = await conn.fetch(f"SELECT {_ENTRY_COLUMNS} FROM consent_ledger WHERE user_id = $1 ORDER BY id", user_id)
    return [
        {name: (value.isoformat() if name in _TIMES and value is not None else value) for name, value in row.items()}
        for row in rows
    ]


async def pseudonymise_ledger(conn: asyncpg.Connection, user_id: str, pseudonym: str) -> int:
    """Put the pseudonym where the user is recorded (the entries' user and actor), through the one path
    the append-only trigger allows; returns the rows changed."""
    await conn.execute("SET LOCAL prefd.consent_maintenance = 'on'")
    changed = rows_affected(
        await conn.execute(
            """UPDATE consent_ledger SET
                   user_id = CASE WHEN user_id = $1 THEN $2 ELSE user_id END,
                   actor = CASE WHEN actor = $1 THEN $2 ELSE actor END
               WHERE user_id = $1 OR actor = $1""",
            user_id,
            pseudonym,
        )
    )
    await conn.execute("RESET prefd.consent_maintenance")
    return changed
