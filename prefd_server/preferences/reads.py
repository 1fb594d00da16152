"""Consistent snapshot reads: effective values and stored overrides, each with its feed cursor."""

from __future__ import annotations

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import snapshot, translated_errors
from prefd_server.kernel.errors import DefinitionNotFound
from prefd_server.kernel.model import Scope
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.model import Definition, StoredValue


class PreferenceReader:
    """Reads that each run in one REPEATABLE READ transaction together with the feed horizon."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def overrides_page(self, scope: Scope, after: str | None, limit: int) -> tuple[list[StoredValue], FeedCursor]:
        """A page of the overrides stored at a scope, with its cursor."""
        async with snapshot(self._pool) as snap:
            values = await preference_sql.page(snap.conn, scope, after, limit)
        return values, FeedCursor.at_horizon(snap.xmin)

    async def definition(self, key: str) -> Definition:
        """One definition; NOT_FOUND if it does not exist."""
        async with translated_errors(), self._pool.acquire() as conn:
            found = await definition_sql.get(conn, key)
        if found is None:
            raise DefinitionNotFound(key)
        return found

    async def definitions_page(self, category: str, after: str | None, limit: int) -> list[Definition]:
        """A page of definitions ordered by key."""
        async with translated_errors(), self._pool.acquire() as conn:
            return await definition_sql.page(conn, category, after, limit)
