"""SQL for the change feed: rows below the snapshot horizon in (xid, id) order, and compaction."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.model import CallInfo, ChangeKind, JsonValue, Scope, ScopeKind

# The output column `xid` is converted to bigint; ORDER BY must name `changes.xid` to walk the index.
_COLUMNS = """id, xid::text::bigint AS xid, kind, scope_kind, scope_id, key, old_value, new_value, version,
    actor, created_at"""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row of the change feed."""

    id: int
    xid: int
    kind: ChangeKind
    scope: Scope
    key: str
    old_value: JsonValue | None
    new_value: JsonValue | None
    version: int
    actor: str
    created_at: datetime
    # What delivering this one event to many watchers computes once (its cursor token, each distinct
    # message), kept with the event and gone with it.
    shared: dict[Hashable, Any] = field(default_factory=dict, compare=False, hash=False, repr=False, kw_only=True)

    @property
    def position(self) -> FeedCursor:
        return FeedCursor(self.xid, self.id)


def event_fields(row: Any) -> dict[str, Any]:
    """The ChangeEvent fields of a `changes` row (id, xid as bigint, kind, scope, key, values, ...)."""
    return {
        "id": row["id"],
        "xid": row["xid"],
        "kind": ChangeKind(row["kind"]),
        "scope": Scope(ScopeKind(row["scope_kind"]), row["scope_id"]),
        "key": row["key"],
        "old_value": row["old_value"],
        "new_value": row["new_value"],
        "version": row["version"],
        "actor": row["actor"],
        "created_at": row["created_at"],
    }


def _event(row: Any) -> ChangeEvent:
    return ChangeEvent(**event_fields(row))


async def current_xid(conn: asyncpg.Connection) -> int:
    """The xid of the caller's transaction (assigning one if it has none yet)."""
    value: int = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
    return value


async def next_xid(conn: asyncpg.Connection) -> int:
    """The xid the next transaction will get (no cursor can be at or beyond it)."""
    value: int = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    return value


HORIZON = """SELECT h.xmin::text::bigint AS horizon,
        (SELECT created_at FROM changes WHERE xid >= h.xmin ORDER BY changes.xid, changes.id LIMIT 1) AS held
    FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) h"""


async def horizon(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """The feed horizon (xmin of a fresh snapshot: every transaction below it has finished) and when the
    oldest change already committed at or above it was made (None if none is): such a change waits
    until the transactions holding the horizon end, in any database of the cluster."""
    row = await conn.fetchrow(HORIZON)
    return row["horizon"], row["held"]


READ_AFTER = f"""SELECT {_COLUMNS} FROM changes
    WHERE (xid, id) > ($1::text::xid8, $2) AND xid < $3::text::xid8
    ORDER BY changes.xid, changes.id LIMIT $4"""


async def read_after(conn: asyncpg.Connection, after: FeedCursor, below_xid: int, limit: int) -> list[ChangeEvent]:
    """Up to `limit` changes after `after` whose transaction is below `below_xid`, in feed order."""
    rows = await conn.fetch(
        READ_AFTER,
        str(after.xid),
        after.change_id,
        str(below_xid),
        limit,
    )
    return [_event(row) for row in rows]


READ_RANGE = f"""SELECT {_COLUMNS} FROM changes
    WHERE (xid, id) > ($1::text::xid8, $2) AND (xid, id) <= ($3::text::xid8, $4)
      AND ($5::text[] IS NULL OR (scope_kind, scope_id) IN (SELECT * FROM unnest($5::text[], $6::text[])))
      AND (cardinality($7::text[]) = 0 OR key LIKE ANY ($7::text[]) OR kind = 'erasure')
    ORDER BY changes.xid, changes.id LIMIT $8"""


async def read_range(
    conn: asyncpg.Connection,
    after: FeedCursor,
    through: FeedCursor,
    scopes: Sequence[Scope] | None,
    key_prefixes: Sequence[str],
    limit: int,
) -> list[ChangeEvent]:
    """Changes in (after, through] at the given scopes (all when None) and key prefixes, in feed order."""
    rows = await conn.fetch(
        READ_RANGE,
        str(after.xid),
        after.change_id,
        str(through.xid),
        through.change_id,
        [s.kind.value for s in scopes] if scopes is not None else None,
        [s.id for s in scopes] if scopes is not None else None,
        [_like_prefix(p) for p in key_prefixes],
        limit,
    )
    return [_event(row) for row in rows]


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def append_change(
    conn: asyncpg.Connection,
    kind: ChangeKind,
    scope: Scope,
    key: str,
    old: JsonValue | None,
    new: JsonValue | None,
    version: int,
    call: CallInfo,
    reason: str,
) -> int:
    """One change row in the caller's transaction; returns the transaction's xid."""
    xid: int = await conn.fetchval(
        """INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version,
               actor, peer, user_agent, reason, request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           RETURNING xid::text::bigint""",
        kind,
        scope.kind.value,
        scope.id,
        key,
        old,
        new,
        version,
        call.actor,
        call.peer,
        call.user_agent,
        reason,
        call.request_id,
    )
    return xid


async def compacted_through(conn: asyncpg.Connection) -> FeedCursor | None:
    """The newest position through which changes may have been removed, if any were."""
    row = await conn.fetchrow(
        """SELECT through_xid::text::bigint AS xid, through_id FROM feed_compactions
           ORDER BY through_xid DESC, through_id DESC LIMIT 1"""
    )
    return FeedCursor(row["xid"], row["through_id"]) if row else None


async def compact(conn: asyncpg.Connection, older_than: timedelta, call: CallInfo) -> tuple[int, FeedCursor | None]:
    """Remove changes older than `older_than`, keeping each key's latest change before the cutoff (so the
    state of every key at any later point can still be told); record the compaction.

    Runs in the caller's transaction through the one path the append-only trigger allows.
    """
    await conn.execute("SET LOCAL prefd.change_maintenance = 'on'")
    row = await conn.fetchrow(
        """WITH latest AS (
               SELECT DISTINCT ON (kind, scope_kind, scope_id, key) id FROM changes
               WHERE created_at < now() - $1::interval
               ORDER BY kind, scope_kind, scope_id, key, id DESC),
           removed AS (
               DELETE FROM changes
               WHERE created_at < now() - $1::interval AND id NOT IN (SELECT id FROM latest)
               RETURNING xid, id)
           SELECT count(*) AS removed,
                  (SELECT xid::text::bigint FROM removed ORDER BY xid DESC, id DESC LIMIT 1) AS xid,
                  (SELECT id FROM removed ORDER BY xid DESC, id DESC LIMIT 1) AS id
           FROM removed""",
        older_than,
    )
    await conn.execute("RESET prefd.change_maintenance")
    removed: int = row["removed"]
    through = FeedCursor(row["xid"], row["id"]) if removed else None
    if through is not None:
        await conn.execute(
            """INSERT INTO feed_compactions (through_xid, through_id, removed, actor, cutoff)
               VALUES ($1::text::xid8, $2, $3, $4, now() - $5::interval)""",
            str(through.xid),
            through.change_id,
            removed,
            call.actor,
            older_than,
        )
    await append_change(
        conn,
        ChangeKind.MAINTENANCE,
        Scope(ScopeKind.GLOBAL),
        "changes.purge",
        None,
        {"removed": removed, "older_than_s": older_than.total_seconds()},
        0,
        call,
        "retention purge",
    )
    return removed, through


async def notify(conn: asyncpg.Connection, channel: str) -> None:
    """Wake every process LISTENing on `channel` (outside any write transaction: NOTIFY takes a global
    lock at commit)."""
    await conn.execute(f"NOTIFY {channel}")
