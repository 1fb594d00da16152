"""SQL for preference templates."""

from __future__ import annotations

from typing import Any

import asyncpg

from prefd_server.kernel.model import ScopeKind
from prefd_server.preferences.templates import Template

_COLUMNS = """name, description, scope_kind, template_values, version, created_at, updated_at, updated_by,
    times_applied, last_applied_at"""


def _template(row: Any) -> Template:
    return Template(
        name=row["name"],
        scope_kind=ScopeKind(row["scope_kind"]),
        values=dict(row["template_values"]),
        description=row["description"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
        times_applied=row["times_applied"],
        last_applied_at=row["last_applied_at"],
    )


async def insert(conn: asyncpg.Connection, template: Template, actor: str) -> Template | None:
    """Store a new template; None when the name is taken."""
    row = await conn.fetchrow(
        f"""INSERT INTO preference_templates (name, description, scope_kind, template_values, updated_by)
            VALUES ($1, $2, $3, $4::jsonb, $5)
            ON CONFLICT (name) DO NOTHING
            RETURNING {_COLUMNS}""",
        template.name,
        template.description,
        template.scope_kind.value,
        dict(template.values),
        actor,
    )
    return _template(row) if row else None


async def get(conn: asyncpg.Connection, name: str, *, for_update: bool = False) -> Template | None:
    """One template, optionally locked for the rest of the transaction."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM preference_templates WHERE name = $1{lock}", name)
    return _template(row) if row else None


async def update(conn: asyncpg.Connection, template: Template, actor: str) -> Template:
    """Replace a (locked) template's description and values, bumping its version."""
    row = await conn.fetchrow(
        f"""UPDATE preference_templates
            SET description = $2, template_values = $3::jsonb, version = version + 1, updated_at = now(),
                updated_by = $4
            WHERE name = $1
            RETURNING {_COLUMNS}""",
        template.name,
        template.description,
        dict(template.values),
        actor,
    )
    return _template(row)


async def delete(conn: asyncpg.Connection, name: str) -> bool:
    """Delete a template; False when there was none."""
    return bool(await conn.fetchval("DELETE FROM preference_templates WHERE name = $1 RETURNING true", name))


async def page(conn: asyncpg.Connection, after: str | None, limit: int) -> list[Template]:
    """Up to `limit` templates after name `after`, in name order."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM preference_templates WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2",
        after,
        limit,
    )
    return [_template(row) for row in rows]


async def count_use(conn: asyncpg.Connection, name: str) -> None:
    """One more application of the template, now (in the applying write's transaction)."""
    await conn.execute(
        "UPDATE preference_templates SET times_applied = times_applied + 1, last_applied_at = now() WHERE name = $1",
        name,
    )
