"""SQL for AI configs, their sealed API keys, the model catalog, and their change rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from prefd_server.aiconfig.model import AIConfigRecord, APIKeySet, ModelInfo
from prefd_server.aiconfig.secretbox import Sealed
from prefd_server.kernel.model import Scope, ScopeKind

_CONFIG_COLUMNS = """c.id::text AS id, c.scope_kind, c.scope_id, c.name, c.priority, c.active, c.configuration,
    c.key_version, c.version, c.created_at, c.created_by, c.updated_at, c.updated_by,
    (SELECT last4 FROM ai_api_keys k WHERE k.config_id = c.id AND k.slot = 'primary') AS primary_last4,
    (SELECT last4 FROM ai_api_keys k WHERE k.config_id = c.id AND k.slot = 'secondary') AS secondary_last4"""
_MODEL_COLUMNS = """model, context_window, output_limit, input_nanos_per_1k, output_nanos_per_1k, features, version,
    updated_at"""


def _record(row: Any) -> AIConfigRecord:
    keys = None
    if row["primary_last4"] is not None:
        keys = APIKeySet(row["key_version"], row["primary_last4"], row["secondary_last4"] or "")
    return AIConfigRecord(
        id=row["id"],
        scope=Scope(ScopeKind(row["scope_kind"]), row["scope_id"]),
        name=row["name"],
        priority=row["priority"],
        active=row["active"],
        values=dict(row["configuration"]),
        keys=keys,
        version=row["version"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
    )


def _model(row: Any) -> ModelInfo:
    return ModelInfo(
        model=row["model"],
        context_window=row["context_window"],
        output_limit=row["output_limit"],
        input_nanos_per_1k=row["input_nanos_per_1k"],
        output_nanos_per_1k=row["output_nanos_per_1k"],
        features=tuple(row["features"]),
        version=row["version"],
        updated_at=row["updated_at"],
    )


async def lock_scope(conn: asyncpg.Connection, scope: Scope) -> None:
    """Serialise AI config writers of one scope (an advisory lock: the transaction gets no xid yet)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"prefd:ai:{scope.kind}:{scope.id}")


async def scope_of(conn: asyncpg.Connection, config_id: str) -> Scope | None:
    row = await conn.fetchrow("SELECT scope_kind, scope_id FROM ai_configs WHERE id = $1::uuid", config_id)
    return Scope(ScopeKind(row["scope_kind"]), row["scope_id"]) if row else None


async def get(conn: asyncpg.Connection, config_id: str) -> AIConfigRecord | None:
    row = await conn.fetchrow(f"SELECT {_CONFIG_COLUMNS} FROM ai_configs c WHERE c.id = $1::uuid", config_id)
    return _record(row) if row else None


async def at_scopes(conn: asyncpg.Connection, scopes: Sequence[Scope]) -> dict[Scope, list[AIConfigRecord]]:
    """Every config (active or not) at each scope, by priority then name."""
    rows = await conn.fetch(
        f"""SELECT {_CONFIG_COLUMNS} FROM ai_configs c
            WHERE (c.scope_kind, c.scope_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
            ORDER BY c.priority, c.name""",
        [s.kind.value for s in scopes],
        [s.id for s in scopes],
    )
    found: dict[Scope, list[AIConfigRecord]] = {s: [] for s in scopes}
    for row in rows:
        record = _record(row)
        found[record.scope].append(record)
    return found


async def page(
    conn: asyncpg.Connection, scope: Scope, after: tuple[int, str] | None, limit: int
) -> list[AIConfigRecord]:
    """Configs at one scope after (priority, name), by priority then name."""
    rows = await conn.fetch(
        f"""SELECT {_CONFIG_COLUMNS} FROM ai_configs c
            WHERE c.scope_kind = $1 AND c.scope_id = $2 AND ($3::int IS NULL OR (c.priority, c.name) > ($3, $4))
            ORDER BY c.priority, c.name LIMIT $5""",
        scope.kind.value,
        scope.id,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [_record(row) for row in rows]


async def name_taken(conn: asyncpg.Connection, scope: Scope, name: str, except_id: str | None) -> bool:
    found: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM ai_configs WHERE scope_kind = $1 AND scope_id = $2 AND name = $3
                          AND ($4::uuid IS NULL OR id <> $4::uuid))""",
        scope.kind.value,
        scope.id,
        name,
        except_id,
    )
    return found


async def upsert(conn: asyncpg.Connection, record: AIConfigRecord, actor: str) -> None:
    """Store a config's row (insert a new id, else replace its mutable fields)."""
    await conn.execute(
        """INSERT INTO ai_configs (id, scope_kind, scope_id, name, priority, active, configuration, key_version,
               version, created_by, updated_by)
           VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
           ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, priority = EXCLUDED.priority,
               active = EXCLUDED.active, configuration = EXCLUDED.configuration,
               key_version = EXCLUDED.key_version, version = EXCLUDED.version,
               updated_at = now(), updated_by = EXCLUDED.updated_by""",
        record.id,
        record.scope.kind.value,
        record.scope.id,
        record.name,
        record.priority,
        record.active,
        record.values,
        record.keys.key_version if record.keys else 0,
        record.version,
        actor,
    )


async def delete(conn: asyncpg.Connection, config_id: str) -> None:
    await conn.execute("DELETE FROM ai_configs WHERE id = $1::uuid", config_id)


async def store_key(conn: asyncpg.Connection, config_id: str, slot: str, sealed: Sealed | None, last4: str) -> None:
    """Put a sealed key in a slot, or empty the slot (None)."""
    if sealed is None:
        await conn.execute("DELETE FROM ai_api_keys WHERE config_id = $1::uuid AND slot = $2", config_id, slot)
        return
    await conn.execute(
        """INSERT INTO ai_api_keys (config_id, slot, key_id, nonce, ciphertext, last4)
           VALUES ($1::uuid, $2, $3, $4, $5, $6)
           ON CONFLICT (config_id, slot) DO UPDATE SET key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,
               ciphertext = EXCLUDED.ciphertext, last4 = EXCLUDED.last4""",
        config_id,
        slot,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
        last4,
    )


async def demote_primary(conn: asyncpg.Connection, config_id: str) -> None:
    """The primary key becomes the secondary (the old secondary is dropped)."""
    await conn.execute("DELETE FROM ai_api_keys WHERE config_id = $1::uuid AND slot = 'secondary'", config_id)
    await conn.execute(
        "UPDATE ai_api_keys SET slot = 'secondary' WHERE config_id = $1::uuid AND slot = 'primary'", config_id
    )


async def sealed_keys(conn: asyncpg.Connection, config_id: str) -> dict[str, Sealed]:
    """A config's sealed keys by slot."""
    rows = await conn.fetch(
        "SELECT slot, key_id, nonce, ciphertext FROM ai_api_keys WHERE config_id = $1::uuid", config_id
    )
    return {row["slot"]: Sealed(row["key_id"], row["nonce"], row["ciphertext"]) for row in rows}


async def all_sealed_keys(conn: asyncpg.Connection) -> list[tuple[str, str, Sealed]]:
    """(config id, slot, sealed) of every stored key, locked for re-encryption."""
    rows = await conn.fetch(
        "SELECT config_id::text AS id, slot, key_id, nonce, ciphertext FROM ai_api_keys ORDER BY 1, 2 FOR UPDATE"
    )
    return [(row["id"], row["slot"], Sealed(row["key_id"], row["nonce"], row["ciphertext"])) for row in rows]


async def models(conn: asyncpg.Connection) -> dict[str, ModelInfo]:
    rows = await conn.fetch(f"SELECT {_MODEL_COLUMNS} FROM ai_models ORDER BY model")
    return {row["model"]: _model(row) for row in rows}


async def lock_model(conn: asyncpg.Connection, model: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"prefd:ai_model:{model}")


async def upsert_model(conn: asyncpg.Connection, model: ModelInfo, actor: str) -> ModelInfo:
    row = await conn.fetchrow(
        f"""INSERT INTO ai_models (model, context_window, output_limit, input_nanos_per_1k, output_nanos_per_1k,
                features, updated_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (model) DO UPDATE SET context_window = EXCLUDED.context_window,
                output_limit = EXCLUDED.output_limit, input_nanos_per_1k = EXCLUDED.input_nanos_per_1k,
                output_nanos_per_1k = EXCLUDED.output_nanos_per_1k, features = EXCLUDED.features,
                version = ai_models.version + 1, updated_at = now(), updated_by = EXCLUDED.updated_by
            RETURNING {_MODEL_COLUMNS}""",
        model.model,
        model.context_window,
        model.output_limit,
        model.input_nanos_per_1k,
        model.output_nanos_per_1k,
        list(model.features),
        actor,
    )
    return _model(row)


def model_document(model: ModelInfo) -> dict[str, Any]:
    """A catalog model as its change row records it."""
    return {
        "context_window": model.context_window,
        "output_limit": model.output_limit,
        "input_nanos_per_1k": model.input_nanos_per_1k,
        "output_nanos_per_1k": model.output_nanos_per_1k,
        "features": list(model.features),
    }
