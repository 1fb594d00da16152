"""SQL for the consent ledger: entries appended with their change rows, current state and history."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.db import lock_scope, translated_errors
from prefd_server.kernel.model import CallInfo, ChangeKind, JsonValue, Scope, ScopeKind
from prefd_server.notifications.model import ConsentEntry, ConsentStatus, LegalBasis

_COLUMNS = """id, user_id, purpose, legal_basis, status, source, notice_version, proof_reference,
    granted_at, expires_at, withdrawn_at, actor, recorded_at"""

# Builds the entry to append from the purpose's latest entry (None: never recorded) and the
# transaction's time; raises to append nothing.
EntryBuilder = Callable[[ConsentEntry | None, datetime], ConsentEntry]


def change_key(purpose: str) -> str:
    """The key of a purpose's change rows."""
    return f"consent/{purpose}"


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def entry_document(entry: ConsentEntry) -> dict[str, JsonValue]:
    """The entry as its change row's value. The user and the actor are the change row's scope and
    actor columns (which erasure pseudonymises), so they are left out here."""
    return {
        "purpose": entry.purpose,
        "legal_basis": entry.legal_basis.value,
        "status": entry.status.value,
        "source": entry.source,
        "notice_version": entry.notice_version,
        "proof_reference": entry.proof_reference,
        "granted_at": _iso(entry.granted_at),
        "expires_at": _iso(entry.expires_at),
        "withdrawn_at": _iso(entry.withdrawn_at),
    }


def _entry(row: Any) -> ConsentEntry:
    return ConsentEntry(
        user_id=row["user_id"],
        purpose=row["purpose"],
        legal_basis=LegalBasis(row["legal_basis"]),
        status=ConsentStatus(row["status"]),
        source=row["source"],
        notice_version=row["notice_version"],
        proof_reference=row["proof_reference"],
        granted_at=row["granted_at"],
        expires_at=row["expires_at"],
        withdrawn_at=row["withdrawn_at"],
        actor=row["actor"],
        entry_id=row["id"],
        recorded_at=row["recorded_at"],
    )


async def lock_user(conn: asyncpg.Connection, user_id: str) -> datetime:
    """Serialise writers of the user's scope (the lock every USER-scope writer and erasure takes);
    returns the transaction's time."""
    return await lock_scope(conn, Scope(ScopeKind.USER, user_id))


async def _latest(conn: asyncpg.Connection, user_id: str, purpose: str) -> tuple[ConsentEntry | None, int]:
    """The purpose's latest entry (None: never recorded) and how many entries it has."""
    row = await conn.fetchrow(
        f"""SELECT {_COLUMNS}, count(*) OVER () AS entries FROM consent_ledger
            WHERE user_id = $1 AND purpose = $2 ORDER BY id DESC LIMIT 1""",
        user_id,
        purpose,
    )
    return (_entry(row), row["entries"]) if row is not None else (None, 0)


async def _insert(conn: asyncpg.Connection, entry: ConsentEntry, call: CallInfo) -> ConsentEntry:
    """The ledger row of the change row just appended in this transaction (it takes that row's id)."""
    row = await conn.fetchrow(
        f"""INSERT INTO consent_ledger (id, user_id, purpose, legal_basis, status, source, notice_version,
                proof_reference, granted_at, expires_at, withdrawn_at, actor, peer, user_agent)
            VALUES (currval(pg_get_serial_sequence('changes', 'id')), $1, $2, $3, $4, $5, $6, $7, $8, $9,
                $10, $11, $12, $13)
            RETURNING {_COLUMNS}""",
        entry.user_id,
        entry.purpose,
        entry.legal_basis.value,
        entry.status.value,
        entry.source,
        entry.notice_version,
        entry.proof_reference,
        entry.granted_at,
        entry.expires_at,
        entry.withdrawn_at,
        call.actor,
        call.peer,
        call.user_agent,
    )
    return _entry(row)


async def append(
    pool: asyncpg.Pool, user_id: str, purpose: str, build: EntryBuilder, call: CallInfo
) -> tuple[ConsentEntry, int]:
    """Append the entry `build` makes and its change row (kind consent) in one transaction under the
    user's scope lock: (the recorded entry, the transaction's xid)."""
    async with translated_errors(), pool.acquire() as conn, conn.transaction():
        now = await lock_user(conn, user_id)
        previous, entries = await _latest(conn, user_id, purpose)
        entry = build(previous, now)
        xid = await feed_sql.append_change(
            conn,
            ChangeKind.CONSENT,
            Scope(ScopeKind.USER, user_id),
            change_key(purpose),
            entry_document(previous) if previous is not None else None,
            entry_document(entry),
            entries + 1,
            call,
            f"consent {entry.status.value}",
        )
        return await _insert(conn, entry, call), xid


async def current(conn: asyncpg.Connection, user_ids: Sequence[str]) -> dict[str, dict[str, ConsentEntry]]:
    """Each user's latest entry per purpose (users with none map to {})."""
    found: dict[str, dict[str, ConsentEntry]] = {user_id: {} for user_id in user_ids}
    rows = await conn.fetch(
        f"""SELECT DISTINCT ON (user_id, purpose) {_COLUMNS} FROM consent_ledger
            WHERE user_id = ANY($1::text[]) ORDER BY user_id, purpose, id DESC""",
        list(found),
    )
    for row in rows:
        found[row["user_id"]][row["purpose"]] = _entry(row)
    return found


async def history(
    pool: asyncpg.Pool, user_id: str, purpose: str | None, after_id: int, limit: int
) -> list[ConsentEntry]:
    """Up to `limit` of the user's entries after entry `after_id`, oldest first (one purpose, or all)."""
    async with translated_errors(), pool.acquire() as conn:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM consent_ledger
                WHERE user_id = $1 AND ($2::text IS NULL OR purpose = $2) AND id > $3
                ORDER BY id LIMIT $4""",
            user_id,
            purpose,
            after_id,
            limit,
        )
    return [_entry(row) for row in rows]
