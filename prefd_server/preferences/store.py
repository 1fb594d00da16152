"""SQL for stored overrides and their change rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.kernel.model import GLOBAL_SCOPE, CallInfo, JsonValue, KeyChange, Scope, ScopeKind, Subject
from prefd_server.preferences.model import StoredValue

_VALUE_COLUMNS = "scope_kind, scope_id, key, value, version, updated_at, updated_by"


def _stored(row: Any) -> StoredValue:
    return StoredValue(
        scope=Scope(ScopeKind(row["scope_kind"]), row["scope_id"]),
        key=row["key"],
        value=row["value"],
        version=row["version"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
    )


async def current_versions(
    conn: asyncpg.Connection, scope: Scope, keys: Sequence[str] | None = None
) -> dict[str, tuple[JsonValue | None, int]]:
    """(value or None if removed, version) of every key ever written at a scope (or those given)."""
    rows = await conn.fetch(
        """SELECT key, value, version FROM preference_values
           WHERE scope_kind = $1 AND scope_id = $2 AND ($3::text[] IS NULL OR key = ANY($3::text[]))""",
        scope.kind.value,
        scope.id,
        list(keys) if keys is not None else None,
    )
    return {row["key"]: (row["value"], row["version"]) for row in rows}


async def overrides(conn: asyncpg.Connection, scopes: Sequence[Scope]) -> dict[Scope, dict[str, StoredValue]]:
    """The live overrides stored at each of the given scopes."""
    result: dict[Scope, dict[str, StoredValue]] = {scope: {} for scope in scopes}
    if not scopes:
        return result
    rows = await conn.fetch(
        f"""SELECT {_VALUE_COLUMNS} FROM preference_values
            JOIN unnest($1::text[], $2::text[]) AS s(kind, id) ON scope_kind = s.kind AND scope_id = s.id
            WHERE value IS NOT NULL""",
        [s.kind.value for s in scopes],
        [s.id for s in scopes],
    )
    for row in rows:
        stored = _stored(row)
        result[stored.scope][stored.key] = stored
    return result


async def overrides_now(
    conn: asyncpg.Connection, scopes: Sequence[Scope]
) -> tuple[int, dict[Scope, dict[str, StoredValue]]]:
    """The live overrides at each scope and the horizon (xmin) of the snapshot they were read in, in one
    statement (one snapshot, one round trip, no transaction around it)."""
    result: dict[Scope, dict[str, StoredValue]] = {scope: {} for scope in scopes}
    rows = await conn.fetch(
        f"""SELECT h.xmin, v.* FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) h
            LEFT JOIN LATERAL (
                SELECT {_VALUE_COLUMNS} FROM preference_values
                JOIN unnest($1::text[], $2::text[]) AS s(kind, id) ON scope_kind = s.kind AND scope_id = s.id
                WHERE value IS NOT NULL) v ON true""",
        [s.kind.value for s in scopes],
        [s.id for s in scopes],
    )
    for row in rows:
        if row["key"] is not None:
            stored = _stored(row)
            result[stored.scope][stored.key] = stored
    return rows[0]["xmin"], result


def subject_scopes(subjects: Sequence[Subject]) -> list[Scope]:
    """Every distinct scope the subjects resolve through."""
    orgs = {subject.org_id for subject in subjects if subject.org_id}
    users = {subject.user_id for subject in subjects}
    return [
        GLOBAL_SCOPE,
        *(Scope(ScopeKind.ORG, org) for org in sorted(orgs)),
        *(Scope(ScopeKind.USER, user) for user in sorted(users)),
    ]


async def page(conn: asyncpg.Connection, scope: Scope, after: str | None, limit: int) -> list[StoredValue]:
    """Up to `limit` live overrides at a scope after key `after`."""
    rows = await conn.fetch(
        f"""SELECT {_VALUE_COLUMNS} FROM preference_values
            WHERE scope_kind = $1 AND scope_id = $2 AND value IS NOT NULL AND ($3::text IS NULL OR key > $3)
            ORDER BY key LIMIT $4""",
        scope.kind.value,
        scope.id,
        after,
        limit,
    )
    return [_stored(row) for row in rows]


async def scopes_with_key(conn: asyncpg.Connection, key: str) -> list[Scope]:
    """Every scope holding a live override of `key`."""
    rows = await conn.fetch(
        "SELECT scope_kind, scope_id FROM preference_values WHERE key = $1 AND value IS NOT NULL", key
    )
    return [Scope(ScopeKind(r["scope_kind"]), r["scope_id"]) for r in rows]


async def values_of_key(conn: asyncpg.Connection, key: str) -> list[StoredValue]:
    """Every live override of `key`, at every scope."""
    rows = await conn.fetch(f"SELECT {_VALUE_COLUMNS} FROM preference_values WHERE key = $1 AND value IS NOT NULL", key)
    return [_stored(row) for row in rows]


async def apply_changes(
    conn: asyncpg.Connection,
    scope: Scope,
    changes: Sequence[KeyChange],
    call: CallInfo,
    reason: str,
    rollback_of: str = "",
    org_id: str = "",
) -> int | None:
    """Store the new values (None removes) and append one change row per key, in the caller's transaction.
    The change rows record the org they were made under: an ORG scope's own id, for a USER scope the org
    the write named (`org_id`), none for GLOBAL.

    Returns the writing transaction's xid (None when there was nothing to write).
    """
    if not changes:
        return None
    keys = [c.key for c in changes]
    # As JSON text: asyncpg would read a list value inside a jsonb[] parameter as another dimension.
    new_values = [_json_text(c.new_value) for c in changes]
    versions = [c.new_version for c in changes]
    await conn.execute(
        """INSERT INTO preference_values (scope_kind, scope_id, key, value, version, updated_at, updated_by)
           SELECT $1, $2, k, v::jsonb, ver, now(), $6
           FROM unnest($3::text[], $4::text[], $5::bigint[]) AS t(k, v, ver)
           ON CONFLICT (scope_kind, scope_id, key) DO UPDATE
               SET value = EXCLUDED.value, version = EXCLUDED.version,
                   updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by""",
        scope.kind.value,
        scope.id,
        keys,
        new_values,
        versions,
        call.actor,
    )
    xid: int = await conn.fetchval(
        """WITH inserted AS (
               INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version,
                   actor, peer, user_agent, reason, request_id, rollback_of, org_id)
               SELECT 'preference', $1, $2, k, o::jsonb, n::jsonb, ver, $7, $8, $9, $10, $11, $12, $13
               FROM unnest($3::text[], $4::text[], $5::text[], $6::bigint[]) WITH ORDINALITY AS t(k, o, n, ver, i)
               ORDER BY i
               RETURNING xid)
           SELECT xid::text::bigint FROM inserted LIMIT 1""",
        scope.kind.value,
        scope.id,
        keys,
        [_json_text(c.old_value) for c in changes],
        new_values,
        versions,
        call.actor,
        call.peer,
        call.user_agent,
        reason,
        call.request_id,
        rollback_of,
        {ScopeKind.ORG: scope.id, ScopeKind.USER: org_id}.get(scope.kind, ""),
    )
    return xid


def _json_text(value: JsonValue | None) -> str | None:
    """A value as JSON text for a jsonb column; None (no value) stays SQL NULL."""
    return None if value is None else json.dumps(value)


def pending_value(scope: Scope, change: KeyChange, actor: str, written_at: datetime) -> StoredValue:
    """The override a not-yet-stored change will leave (for resolving before commit).

    `written_at` is the writing transaction's `now()`, the time apply_changes stores.
    """
    return StoredValue(scope, change.key, change.new_value, change.new_version, written_at, actor)


async def scope_versions(conn: asyncpg.Connection, scope: Scope) -> list[tuple[str, int]]:
    """(key, version) of every preference key ever written at the scope, by key."""
    rows = await conn.fetch(
        "SELECT key, version FROM preference_values WHERE scope_kind = $1 AND scope_id = $2 ORDER BY key",
        scope.kind.value,
        scope.id,
    )
    return [(row["key"], row["version"]) for row in rows]


async def state_token(conn: asyncpg.Connection, scopes: Sequence[Scope]) -> str:
    """A digest of every preference key's version at the scopes: it changes with any write to them."""
    digest = hashlib.sha256()
    for scope in scopes:
        digest.update(f"{scope}\n".encode())
        for key, version in await scope_versions(conn, scope):
            digest.update(f"{key}={version}\n".encode())
    return digest.hexdigest()[:32]
