"""SQL for definitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from prefd_server.kernel.model import CallInfo, ScopeKind
from prefd_server.preferences.model import Definition, ValueType

_COLUMNS = """key, category, value_type, default_value, allowed_values, min_value, max_value,
    max_length, scopes, sensitive, description, version, created_at, updated_at, updated_by"""


def _definition(row: Any) -> Definition:
    return Definition(
        key=row["key"],
        category=row["category"],
        value_type=ValueType(row["value_type"]),
        default=row["default_value"],
        description=row["description"],
        allowed_values=tuple(row["allowed_values"]),
        min_value=row["min_value"],
        max_value=row["max_value"],
        max_length=row["max_length"],
        scopes=frozenset(ScopeKind(s) for s in row["scopes"]),
        sensitive=row["sensitive"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
    )


def _scopes(definition: Definition) -> list[str]:
    return [s.value for s in ScopeKind if s in definition.scopes]


async def get(conn: asyncpg.Connection, key: str, *, for_update: bool = False) -> Definition | None:
    """One definition, optionally locked for the rest of the transaction."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM definitions WHERE key = $1{lock}", key)
    return _definition(row) if row else None


async def get_many(conn: asyncpg.Connection, keys: Sequence[str]) -> dict[str, Definition]:
    """The definitions of the given keys that exist, by key."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM definitions WHERE key = ANY($1::text[])", list(keys))
    return {row["key"]: _definition(row) for row in rows}


async def all_definitions(conn: asyncpg.Connection) -> list[Definition]:
    """Every definition, ordered by key."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM definitions ORDER BY key")
    return [_definition(row) for row in rows]


async def page(conn: asyncpg.Connection, category: str, after: str | None, limit: int) -> list[Definition]:
    """Up to `limit` definitions after key `after`, in one category when given."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM definitions
            WHERE ($1 = '' OR category = $1) AND ($2::text IS NULL OR key > $2)
            ORDER BY key LIMIT $3""",
        category,
        after,
        limit,
    )
    return [_definition(row) for row in rows]


async def insert(conn: asyncpg.Connection, definition: Definition, call: CallInfo, reason: str) -> Definition | None:
    """Insert a definition with its change row; None if the key exists already."""
    row = await conn.fetchrow(
        f"""INSERT INTO definitions (key, category, value_type, default_value, allowed_values, min_value,
                max_value, max_length, scopes, sensitive, description, updated_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (key) DO NOTHING
            RETURNING {_COLUMNS}""",
        definition.key,
        definition.category,
        definition.value_type.value,
        definition.default,
        list(definition.allowed_values),
        definition.min_value,
        definition.max_value,
        definition.max_length,
        _scopes(definition),
        definition.sensitive,
        definition.description,
        call.actor,
    )
    if row is None:
        return None
    stored = _definition(row)
    await record_definition_change(conn, None, stored, call, reason)
    return stored


async def update(conn: asyncpg.Connection, old: Definition, new: Definition, call: CallInfo) -> Definition:
    """Replace a locked definition's mutable fields and record the change."""
    row = await conn.fetchrow(
        f"""UPDATE definitions SET category = $2, value_type = $3, default_value = $4, allowed_values = $5,
                min_value = $6, max_value = $7, max_length = $8, scopes = $9, sensitive = $10,
                description = $11, version = version + 1, updated_at = now(), updated_by = $12
            WHERE key = $1
            RETURNING {_COLUMNS}""",
        new.key,
        new.category,
        new.value_type.value,
        new.default,
        list(new.allowed_values),
        new.min_value,
        new.max_value,
        new.max_length,
        _scopes(new),
        new.sensitive,
        new.description,
        call.actor,
    )
    stored = _definition(row)
    await record_definition_change(conn, old, stored, call, "")
    return stored


async def delete(conn: asyncpg.Connection, old: Definition, call: CallInfo, reason: str) -> None:
    """Delete a locked definition and record the change."""
    await conn.execute("DELETE FROM definitions WHERE key = $1", old.key)
    await record_definition_change(conn, old, None, call, reason, version=old.version + 1)


def definition_document(definition: Definition) -> dict[str, Any]:
    """A definition as the JSON stored in its change rows."""
    return {
        "category": definition.category,
        "type": definition.value_type.value,
        "default": definition.default,
        "allowed_values": list(definition.allowed_values),
        "min": definition.min_value,
        "max": definition.max_value,
        "max_length": definition.max_length,
        "scopes": _scopes(definition),
        "sensitive": definition.sensitive,
        "description": definition.description,
    }


async def record_definition_change(
    conn: asyncpg.Connection,
    old: Definition | None,
    new: Definition | None,
    call: CallInfo,
    reason: str,
    version: int | None = None,
) -> None:
    """Append the change row of a definition write."""
    key = (new or old).key  # type: ignore[union-attr]
    await conn.execute(
        """INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version,
               actor, peer, user_agent, reason, request_id)
           VALUES ('definition', 'GLOBAL', '', $1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        key,
        definition_document(old) if old else None,
        definition_document(new) if new else None,
        version if version is not None else (new.version if new else 0),
        call.actor,
        call.peer,
        call.user_agent,
        reason,
        call.request_id,
    )


async def lock_keys_shared(conn: asyncpg.Connection, keys: Sequence[str]) -> None:
    """Share-lock definition keys (in key order) until the transaction ends; no xid is assigned."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('prefd:def:' || k, 0)) FROM unnest($1::text[]) AS k",
        sorted(set(keys)),
    )


async def lock_key_exclusive(conn: asyncpg.Connection, key: str) -> None:
    """Lock one definition key against writers of its values until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('prefd:def:' || $1, 0))", key)
