"""SQL over the change history: filtered listings, single changes, retention and a scope's state at a point."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.audit.model import AuditRow, ChangeFilter, KeyState, Point
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import horizon_xid, snapshot, translated_errors
from prefd_server.kernel.errors import ChangeNotFound, invalid
from prefd_server.kernel.feed_store import event_fields
from prefd_server.kernel.model import ChangeKind, JsonValue, Scope

_COLUMNS = """id, xid::text::bigint AS xid, kind, scope_kind, scope_id, key, old_value, new_value, version,
    actor, peer, user_agent, reason, request_id, created_at, rollback_of"""


def _row(row: Any) -> AuditRow:
    return AuditRow(
        **event_fields(row),
        peer=row["peer"],
        user_agent=row["user_agent"],
        reason=row["reason"],
        request_id=row["request_id"],
        rollback_of=row["rollback_of"],
    )


async def list_changes(
    conn: asyncpg.Connection,
    where: ChangeFilter,
    horizon: int,
    after: FeedCursor | None,
    newest_first: bool,
    limit: int,
) -> list[AuditRow]:
    """A keyset page in feed order (xid, id) among transactions below `horizon` (all finished)."""
    sql, params = list_changes_query(where, horizon, after, newest_first, limit)
    return [_row(row) for row in await conn.fetch(sql, *params)]


def list_changes_query(
    where: ChangeFilter, horizon: int, after: FeedCursor | None, newest_first: bool, limit: int
) -> tuple[str, list[Any]]:
    """The SQL and parameters of one ListChanges page.

    Only the filters that are set become conditions, so the planner can walk the feed index (or
    the scope's or actor's feed-ordered index) instead of reading the table. The ORDER BY names
    the table's columns: a bare `xid` would be the converted output column, which no index has.
    """
    direction = "DESC" if newest_first else "ASC"
    conditions = ["xid < $1::text::xid8"]
    params: list[Any] = [str(horizon)]

    def bind(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    # The keyset bound is always a row comparison (from the start or end of the feed on a first page),
    # so every page, the first included, is the same index range scan.
    if after is None:
        after = FeedCursor(horizon, 0) if newest_first else FeedCursor(0, 0)
    compare = "<" if newest_first else ">"
    conditions.append(f"(xid, id) {compare} ({bind(str(after.xid))}::text::xid8, {bind(after.change_id)})")
    if where.scope is not None:
        conditions.append(f"scope_kind = {bind(where.scope.kind.value)} AND scope_id = {bind(where.scope.id)}")
    if where.key_prefix:
        conditions.append(f"key LIKE {bind(_like_prefix(where.key_prefix))}")
    if where.kinds:
        conditions.append(f"kind = ANY({bind(list(where.kinds))}::text[])")
    if where.actor:
        conditions.append(f"actor = {bind(where.actor)}")
    if where.start is not None:
        conditions.append(f"created_at >= {bind(where.start)}")
    if where.end is not None:
        conditions.append(f"created_at < {bind(where.end)}")
    sql = f"""SELECT {_COLUMNS} FROM changes WHERE {" AND ".join(conditions)}
              ORDER BY changes.xid {direction}, changes.id {direction} LIMIT {bind(limit)}"""
    return sql, params


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def get_change(conn: asyncpg.Connection, change_id: int) -> AuditRow | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM changes WHERE id = $1", change_id)
    return _row(row) if row else None


async def retention(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """(highest change id removed by retention, latest cutoff time): history before them is gone."""
    row = await conn.fetchrow("SELECT max(through_id) AS through, max(cutoff) AS cutoff FROM feed_compactions")
    return (row["through"] or 0), row["cutoff"]


async def state_at(
    conn: asyncpg.Connection,
    scope: Scope,
    change_id: int | None,
    time: datetime | None,
    kinds: Sequence[ChangeKind],
) -> dict[str, KeyState]:
    """Each key's latest change at the scope up to a change id or a time (both None: now)."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (kind, key) kind, key, new_value, version FROM changes
           WHERE scope_kind = $1 AND scope_id = $2 AND kind = ANY($3::text[])
             AND ($4::bigint IS NULL OR id <= $4) AND ($5::timestamptz IS NULL OR created_at <= $5)
           ORDER BY kind, key, id DESC""",
        scope.kind.value,
        scope.id,
        list(kinds),
        change_id,
        time,
    )
    return {row["key"]: KeyState(ChangeKind(row["kind"]), row["new_value"], row["version"]) for row in rows}


async def preferences_at(conn: asyncpg.Connection, scope: Scope, point: Point) -> dict[str, JsonValue | None]:
    """Each preference key's value at the scope just after a point (None: no override then)."""
    states = await state_at(conn, scope, point.change_id, point.time, (ChangeKind.PREFERENCE,))
    return {key: state.value for key, state in states.items()}


async def user_history(conn: asyncpg.Connection, user_id: str) -> list[AuditRow]:
    """Every change at the user's scope or made by the user, oldest first."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM changes
            WHERE (scope_kind = 'USER' AND scope_id = $1) OR actor = $1 ORDER BY id""",
        user_id,
    )
    return [_row(row) for row in rows]


class HistoryStore:
    """Reads of the change history: pages, single changes, history points and diffs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def page(
        self, where: ChangeFilter, horizon: int | None, after: FeedCursor | None, newest_first: bool, limit: int
    ) -> tuple[list[AuditRow], int]:
        """A page and the horizon it is bounded by (taken now for a first page)."""
        async with translated_errors(), self.pool.acquire() as conn:
            if horizon is None:
                horizon = await horizon_xid(conn)
            return await list_changes(conn, where, horizon, after, newest_first, limit), horizon

    async def change(self, change_id: int) -> AuditRow:
        async with translated_errors(), self.pool.acquire() as conn:
            row = await get_change(conn, change_id)
        if row is None:
            raise ChangeNotFound(change_id, "id")
        return row

    async def check_point(self, point: Point, field: str) -> None:
        """INVALID_ARGUMENT for a point in the future or before retention; NOT_FOUND for an unknown change."""
        async with translated_errors(), self.pool.acquire() as conn:
            through, cutoff = await retention(conn)
            if point.change_id is not None:
                if point.change_id <= 0:
                    raise invalid(f"{field}.change_id", "must be positive")
                if await get_change(conn, point.change_id) is None:
                    if point.change_id <= through:
                        raise invalid(f"{field}.change_id", "is before the retained history")
                    raise ChangeNotFound(point.change_id, f"{field}.change_id")
                if point.change_id <= through:
                    raise invalid(f"{field}.change_id", "is before the retained history")
            else:
                assert point.time is not None
                now: datetime = await conn.fetchval("SELECT now()")
                if point.time > now:
                    raise invalid(f"{field}.time", "is in the future")
                if cutoff is not None and point.time < cutoff:
                    raise invalid(f"{field}.time", f"is before the retained history (from {cutoff.isoformat()})")

    async def diff(
        self, scope: Scope, start: Point, end: Point | None
    ) -> list[tuple[str, KeyState | None, KeyState | None]]:
        """Keys whose value differs between the points: (key, before, after)."""
        kinds = (ChangeKind.PREFERENCE, ChangeKind.AI_CONFIG)
        async with snapshot(self.pool) as snap:
            before = await state_at(snap.conn, scope, start.change_id, start.time, kinds)
            after = await state_at(snap.conn, scope, end.change_id if end else None, end.time if end else None, kinds)
        found = []
        for key in sorted(before.keys() | after.keys()):
            old, new = before.get(key), after.get(key)
            if (old.value if old else None) != (new.value if new else None):
                found.append((key, old, new))
        return found
