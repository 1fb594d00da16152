"""SQL over the change history: filtered listings, the state of a scope at a point, erasure and export."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.aiconfig import store as ai_sql
from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import horizon_xid, snapshot, translated_errors
from prefd_server.kernel.errors import ChangeNotFound, invalid
from prefd_server.kernel.model import CallInfo, ChangeKind, JsonValue, Scope, ScopeKind
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.preferences import store as preference_sql

_COLUMNS = """id, xid::text::bigint AS xid, kind, scope_kind, scope_id, key, old_value, new_value, version,
    actor, peer, user_agent, reason, request_id, created_at, rollback_of"""


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One change row with everything it records."""

    id: int
    xid: int
    kind: ChangeKind
    scope: Scope
    key: str
    old_value: JsonValue | None
    new_value: JsonValue | None
    version: int
    actor: str
    peer: str
    user_agent: str
    reason: str
    request_id: str
    created_at: datetime
    rollback_of: str

    @property
    def position(self) -> FeedCursor:
        return FeedCursor(self.xid, self.id)

    def document(self) -> dict[str, Any]:
        """As JSON for an export."""
        return {
            "id": self.id,
            "kind": self.kind,
            "scope": str(self.scope),
            "key": self.key,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "time": self.created_at.isoformat(),
            "rollback_of": self.rollback_of,
        }


def _row(row: Any) -> AuditRow:
    return AuditRow(
        id=row["id"],
        xid=row["xid"],
        kind=ChangeKind(row["kind"]),
        scope=Scope(ScopeKind(row["scope_kind"]), row["scope_id"]),
        key=row["key"],
        old_value=row["old_value"],
        new_value=row["new_value"],
        version=row["version"],
        actor=row["actor"],
        peer=row["peer"],
        user_agent=row["user_agent"],
        reason=row["reason"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        rollback_of=row["rollback_of"],
    )


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """What ListChanges selects; every set field must match."""

    scope: Scope | None
    key_prefix: str
    kinds: tuple[ChangeKind, ...]
    actor: str
    start: datetime | None
    end: datetime | None


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


async def max_change_id(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT coalesce(max(id), 0) FROM changes")
    return value


@dataclass(frozen=True, slots=True)
class KeyState:
    """A key's value (None: absent) and version at a point, and the kind of its changes."""

    kind: ChangeKind
    value: JsonValue | None
    version: int


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


# --- privacy ---------------------------------------------------------------------------------


async def pseudonym_key(conn: asyncpg.Connection) -> str:
    key: str = await conn.fetchval("SELECT pseudonym_key FROM installation")
    return key


async def pseudonym(conn: asyncpg.Connection, user_id: str) -> str:
    return pseudonym_of(await pseudonym_key(conn), user_id)


async def erased_at(conn: asyncpg.Connection, pseudonym_id: str) -> datetime | None:
    value: datetime | None = await conn.fetchval("SELECT erased_at FROM erasures WHERE pseudonym = $1", pseudonym_id)
    return value


@dataclass(frozen=True, slots=True)
class ErasureCounts:
    overrides: int
    ai_configs: int
    changes: int
    other_rows: int

    @property
    def any(self) -> bool:
        return bool(self.overrides or self.ai_configs or self.changes or self.other_rows)


async def erase(conn: asyncpg.Connection, user_id: str, pseudonym_id: str) -> ErasureCounts:
    """Delete the user's values and configs and put the pseudonym wherever the id appears, in the
    caller's transaction (which holds the user's scope locks)."""
    overrides = _count(
        await conn.execute(
            "DELETE FROM preference_values WHERE scope_kind = 'USER' AND scope_id = $1 AND value IS NOT NULL", user_id
        )
    )
    await conn.execute("DELETE FROM preference_values WHERE scope_kind = 'USER' AND scope_id = $1", user_id)
    configs = _count(await conn.execute("DELETE FROM ai_configs WHERE scope_kind = 'USER' AND scope_id = $1", user_id))
    other = 0
    for statement in (
        "UPDATE preference_values SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE definitions SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE ai_configs SET created_by = $2 WHERE created_by = $1",
        "UPDATE ai_configs SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE ai_models SET updated_by = $2 WHERE updated_by = $1",
        "UPDATE ai_usage SET user_id = $2 WHERE user_id = $1",
        "UPDATE ai_usage SET actor = $2 WHERE actor = $1",
        "UPDATE feed_compactions SET actor = $2 WHERE actor = $1",
        "UPDATE erasures SET actor = $2 WHERE actor = $1",
    ):
        other += _count(await conn.execute(statement, user_id, pseudonym_id))
    # Totals are derived from the ledger; the pseudonym's own rows stay as they were.
    other += _count(await conn.execute("DELETE FROM ai_usage_totals WHERE user_id = $1", user_id))
    await conn.execute("SET LOCAL prefd.change_maintenance = 'on'")
    changes = _count(
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
    return ErasureCounts(overrides, configs, changes, other)


def _count(status: str) -> int:
    """Rows affected, from a command status such as 'UPDATE 3'."""
    return int(status.rsplit(" ", 1)[-1])


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
        {
            "overrides_deleted": counts.overrides,
            "ai_configs_deleted": counts.ai_configs,
            "changes_pseudonymised": counts.changes,
        },
        0,
        call,
        reason,
    )


async def user_history(conn: asyncpg.Connection, user_id: str) -> list[AuditRow]:
    """Every change at the user's scope or made by the user, oldest first."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM changes
            WHERE (scope_kind = 'USER' AND scope_id = $1) OR actor = $1 ORDER BY id""",
        user_id,
    )
    return [_row(row) for row in rows]


async def user_usage(conn: asyncpg.Connection, user_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT request_id, org_id, model, input_tokens, output_tokens, cost_nanos, recorded_at
           FROM ai_usage WHERE user_id = $1 ORDER BY id""",
        user_id,
    )
    return [{**dict(row), "recorded_at": row["recorded_at"].isoformat()} for row in rows]


# --- the store used by AuditService ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """A validated history point: just after a change, or a time."""

    change_id: int | None = None
    time: datetime | None = None

    def describe(self) -> str:
        return f"change {self.change_id}" if self.change_id is not None else f"time {self.time.isoformat()}"  # type: ignore[union-attr]


class AuditStore:
    """Reads of the change history and the erasure transaction."""

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

    async def erased(self, user_id: str) -> datetime | None:
        async with translated_errors(), self.pool.acquire() as conn:
            return await erased_at(conn, await pseudonym(conn, user_id))

    async def pseudonym(self, user_id: str) -> str:
        async with translated_errors(), self.pool.acquire() as conn:
            return await pseudonym(conn, user_id)

    async def erase(self, user_id: str, call: CallInfo, reason: str) -> tuple[str, ErasureCounts, bool, int | None]:
        """Erase a user in one transaction: (pseudonym, counts, erased now, xid)."""
        async with translated_errors(), self.pool.acquire() as conn:
            async with conn.transaction():
                user_scope = Scope(ScopeKind.USER, user_id)
                # The scope locks preference and AI config writers take, so none races the erasure.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"prefd:{user_scope.kind}:{user_scope.id}"
                )
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    f"prefd:ai:{user_scope.kind}:{user_scope.id}",
                )
                alias = await pseudonym(conn, user_id)
                counts = await erase(conn, user_id, alias)
                already = await erased_at(conn, alias)
                if not counts.any and already is not None:
                    return alias, counts, False, None
                xid = await record_erasure(conn, alias, call, reason, counts)
        return alias, counts, True, xid

    async def export(self, user_id: str) -> dict[str, Any]:
        """The user's stored data that is not resolved elsewhere: overrides, AI configs, usage, history."""
        scope = Scope(ScopeKind.USER, user_id)
        async with snapshot(self.pool) as snap:
            overrides = (await preference_sql.overrides(snap.conn, [scope]))[scope]
            configs = (await ai_sql.at_scopes(snap.conn, [scope]))[scope]
            usage = await user_usage(snap.conn, user_id)
            history = await user_history(snap.conn, user_id)
        return {
            "overrides": {
                key: {"value": v.value, "version": v.version, "updated_at": v.updated_at.isoformat()}
                for key, v in sorted(overrides.items())
            },
            "ai_configs": [{"id": c.id, "version": c.version, **c.audit_document()} for c in configs],
            "usage": usage,
            "changes": [row.document() for row in history],
        }
