"""A user's data across the domains: the export snapshot and the erasure transaction, with their SQL."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from prefd_server.audit.model import AuditRow, ErasureCounts
from prefd_server.audit.store import user_history
from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.db import snapshot, translated_errors
from prefd_server.kernel.model import CallInfo, ChangeKind, Scope, ScopeKind, Subject
from prefd_server.kernel.privacy import ExportPart, PrivacyRegistry, pseudonym_of, pseudonymise, rows_affected


async def pseudonym_key(conn: asyncpg.Connection) -> str:
    key: str = await conn.fetchval("SELECT pseudonym_key FROM installation")
    return key


async def pseudonym(conn: asyncpg.Connection, user_id: str) -> str:
    return pseudonym_of(await pseudonym_key(conn), user_id)


async def erased_at(conn: asyncpg.Connection, pseudonym_id: str) -> datetime | None:
    value: datetime | None = await conn.fetchval("SELECT erased_at FROM erasures WHERE pseudonym = $1", pseudonym_id)
    return value


async def pseudonymise_records(conn: asyncpg.Connection, user_id: str, pseudonym_id: str) -> int:
    """Put the pseudonym where the user is recorded as the actor of a compaction or an erasure."""
    statements = (
        "UPDATE feed_compactions SET actor = $2 WHERE actor = $1",
        "UPDATE erasures SET actor = $2 WHERE actor = $1",
    )
    return await pseudonymise(conn, statements, user_id, pseudonym_id)


async def pseudonymise_history(conn: asyncpg.Connection, user_id: str, pseudonym_id: str) -> int:
    """Put the pseudonym in every change row at the user's scope or made by the user; returns how many."""
    await conn.execute("SET LOCAL prefd.change_maintenance = 'on'")
    changes = rows_affected(
        await conn.execute(
            """UPDATE changes SET
                   scope_id = CASE WHEN scope_kind = 'USER' AND scope_id = $1 THEN $2 ELSE scope_id END,
                   actor = CASE WHEN actor = $1 THEN $2 ELSE actor END
               WHERE (scope_kind = 'USER' AND scope_id = $1) OR actor = $1""",
            user_id,
            pseudonym_id,
        )
    )
    await conn.execute("RESET prefd.change_maintenance")
    return changes


async def record_erasure(
    conn: asyncpg.Connection, pseudonym_id: str, call: CallInfo, reason: str, counts: ErasureCounts
) -> int:
    """The erasure's own change row (at the pseudonym's USER scope) and its record; returns the xid."""
    await conn.execute(
        """INSERT INTO erasures (pseudonym, actor, reason) VALUES ($1, $2, $3)
           ON CONFLICT (pseudonym) DO UPDATE SET erased_at = now(), actor = EXCLUDED.actor, reason = EXCLUDED.reason""",
        pseudonym_id,
        call.actor,
        reason,
    )
    return await feed_sql.append_change(
        conn,
        ChangeKind.ERASURE,
        Scope(ScopeKind.USER, pseudonym_id),
        "erasure",
        None,
        counts.document(),
        0,
        call,
        reason,
    )


class UserDataStore:
    """Export and erasure of one user: the registry's participants, then the change history's part."""

    def __init__(self, pool: asyncpg.Pool, privacy: PrivacyRegistry, commits: LocalCommits | None = None) -> None:
        self.pool = pool
        self._privacy = privacy
        self._commits = commits

    async def erased(self, user_id: str) -> datetime | None:
        """When the user was erased (None: never)."""
        async with translated_errors(), self.pool.acquire() as conn:
            return await erased_at(conn, await pseudonym(conn, user_id))

    async def export(self, subject: Subject) -> tuple[list[ExportPart], list[AuditRow]]:
        """Every participant's part of the user's data and the user's change history, in one snapshot."""
        async with snapshot(self.pool) as snap:
            parts = await self._privacy.export(snap.conn, subject)
            history = await user_history(snap.conn, subject.user_id)
        return parts, history

    async def erase(self, user_id: str, call: CallInfo, reason: str) -> tuple[str, ErasureCounts, bool]:
        """Erase a user in one transaction, then tell this process: (pseudonym, counts, erased now)."""
        alias, counts, xid = await self._erase(user_id, call, reason)
        if self._commits is not None:
            self._commits.committed(ChangeKind.ERASURE, Scope(ScopeKind.USER, user_id), xid or 0)
        self._privacy.after_erase(user_id, xid)
        return alias, counts, xid is not None

    async def _erase(self, user_id: str, call: CallInfo, reason: str) -> tuple[str, ErasureCounts, int | None]:
        """(pseudonym, counts, xid of the erasure; None if nothing was left to erase)."""
        async with translated_errors(), self.pool.acquire() as conn, conn.transaction():
            alias = await pseudonym(conn, user_id)
            # Each participant first locks what its writers of the user's scope lock, so none races this.
            erased = await self._privacy.erase(conn, user_id, alias)
            other = await pseudonymise_records(conn, user_id, alias)
            counts = ErasureCounts.of(erased, await pseudonymise_history(conn, user_id, alias), other)
            if not counts.any and await erased_at(conn, alias) is not None:
                return alias, counts, None
            return alias, counts, await record_erasure(conn, alias, call, reason, counts)
