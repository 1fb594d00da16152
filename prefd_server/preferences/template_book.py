"""Preference templates kept and applied: each change one transaction; applying is one preference write."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import TemplateExists, TemplateNotFound, ValidationFailed, VersionConflict, invalid
from prefd_server.kernel.model import CallInfo, Scope
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import templates_store as template_sql
from prefd_server.preferences.model import KeyWrite, ScopeWrite, WriteResult
from prefd_server.preferences.templates import Template, name_problem, template_violations
from prefd_server.preferences.writes import PreferenceWriter


class TemplateBook:
    """Create, change, read and apply templates."""

    def __init__(self, pool: asyncpg.Pool, writer: PreferenceWriter) -> None:
        self._pool = pool
        self._writer = writer

    async def create(self, template: Template, keys_in_order: list[str], call: CallInfo) -> Template:
        """Store a new template checked against today's definitions; TemplateExists when the name is taken."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await self._check(conn, template, keys_in_order)
            stored = await template_sql.insert(conn, template, call.actor)
        if stored is None:
            raise TemplateExists(template.name)
        return stored

    async def update(
        self, template: Template, keys_in_order: list[str], expected_version: int | None, call: CallInfo
    ) -> Template:
        """Replace a template's description and values (its scope kind stays)."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            current = await template_sql.get(conn, template.name, for_update=True)
            if current is None:
                raise TemplateNotFound(template.name)
            if expected_version is not None and expected_version != current.version:
                raise VersionConflict(template.name, expected_version, current.version)
            if template.scope_kind is not current.scope_kind:
                raise invalid("template.scope_kind", f"stays {current.scope_kind.value}: delete and create instead")
            await self._check(conn, template, keys_in_order)
            return await template_sql.update(conn, template, call.actor)

    async def get(self, name: str) -> Template:
        _check_name(name)
        async with translated_errors(), self._pool.acquire() as conn:
            found = await template_sql.get(conn, name)
        if found is None:
            raise TemplateNotFound(name)
        return found

    async def page(self, after: str | None, limit: int) -> list[Template]:
        async with translated_errors(), self._pool.acquire() as conn:
            return await template_sql.page(conn, after, limit)

    async def delete(self, name: str) -> None:
        _check_name(name)
        async with translated_errors(), self._pool.acquire() as conn:
            if not await template_sql.delete(conn, name):
                raise TemplateNotFound(name)

    async def apply(
        self, name: str, scope: Scope, org_id: str, reason: str, dry_run: bool, call: CallInfo
    ) -> tuple[WriteResult, Template]:
        """Write the template's values at `scope` (of its kind) as one preference write whose change rows
        name the template, counting the use in the same transaction (not on a dry run)."""
        template = await self.get(name)
        if scope.kind is not template.scope_kind:
            raise invalid("scope", f"template {name} applies to {template.scope_kind.value} scopes")
        writes = tuple(KeyWrite(key, template.values[key]) for key in sorted(template.values))
        why = f"template {name} v{template.version}" + (f": {reason}" if reason else "")
        command = ScopeWrite(scope, writes, why, dry_run, org_id, field="template.values")

        async def count_use(conn: asyncpg.Connection) -> None:
            await template_sql.count_use(conn, name)

        return await self._writer.write(command, call, also=count_use), template

    async def _check(self, conn: asyncpg.Connection, template: Template, keys_in_order: Sequence[str]) -> None:
        definitions = await definition_sql.get_many(conn, list(dict.fromkeys(keys_in_order)))
        violations = template_violations(template, list(keys_in_order), definitions)
        if violations:
            raise ValidationFailed(violations)


def _check_name(name: str) -> None:
    problem = name_problem(name)
    if problem:
        raise invalid("name", problem)
