"""SQL of the statistics: the consumer's position and runner lock, reading the feed, applying a plan's
deltas, erasing a user from the counts, resetting, and the reads behind every RPC."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.model import JsonValue
from prefd_server.statistics.model import (
    AdoptionFigures,
    Counted,
    DayRow,
    KeyFigures,
    Popular,
    ValueCount,
)
from prefd_server.statistics.rules import FeedRow, Plan, Slot, distinct_deltas

# pg_advisory_lock key held by the one statistics runner across processes ("prefdst" in ASCII).
RUNNER_LOCK_KEY = 0x70726566647374

TABLES = (
    "statistics_current",
    "statistics_values",
    "statistics_keys",
    "statistics_users",
    "statistics_daily",
)


async def try_runner_lock(conn: asyncpg.Connection) -> bool:
    """Take the runner's session lock on `conn` if no other session holds it."""
    taken: bool = await conn.fetchval("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK_KEY)
    return taken


async def lock_position(conn: asyncpg.Connection) -> tuple[FeedCursor, int]:
    """The consumer's position, row-locked until the transaction ends (appliers, erasures and resets of
    the statistics take their turns here, so no change is counted twice), and the feed horizon of the
    statement's snapshot: every transaction below it has finished (taken before a wait for the lock, so
    it may be older than the lock's moment, which only makes the batch shorter)."""
    row = await conn.fetchrow(
        """SELECT xid, change_id, pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon
           FROM statistics_position FOR UPDATE"""
    )
    return FeedCursor(row["xid"], row["change_id"]), row["horizon"]


async def save_position(conn: asyncpg.Connection, position: FeedCursor) -> None:
    await conn.execute(
        "UPDATE statistics_position SET xid = $1, change_id = $2, updated_at = now()",
        position.xid,
        position.change_id,
    )


READ_CHANGES = """SELECT id, xid::text::bigint AS xid, kind, scope_kind, scope_id, key, version,
           new_value::text AS value_json, md5(new_value::text) AS value_hash,
           (created_at AT TIME ZONE 'UTC')::date AS day
    FROM changes
    WHERE (xid, id) > ($1::text::xid8, $2) AND xid < $3::text::xid8
    ORDER BY changes.xid, changes.id LIMIT $4"""


async def read_changes(conn: asyncpg.Connection, after: FeedCursor, below_xid: int, limit: int) -> list[FeedRow]:
    """Up to `limit` change rows after `after` whose transaction is below `below_xid`, in feed order
    (the kernel feed's gap-free read, with the value as canonical JSON and its hash)."""
    rows = await conn.fetch(READ_CHANGES, str(after.xid), after.change_id, str(below_xid), limit)
    return [
        FeedRow(
            r["id"],
            r["xid"],
            r["kind"],
            r["scope_kind"],
            r["scope_id"],
            r["key"],
            r["version"],
            r["value_hash"],
            r["value_json"],
            r["day"],
        )
        for r in rows
    ]


async def counted_rows(
    conn: asyncpg.Connection, slots: Sequence[Slot], user_scopes: Sequence[str]
) -> dict[Slot, Counted]:
    """The counted value of each slot that has one, and of every key of the given USER scopes."""
    rows = await conn.fetch(
        """SELECT c.scope_kind, c.scope_id, c.key, c.value_hash, c.version
           FROM unnest($1::text[], $2::text[], $3::text[]) AS s(scope_kind, scope_id, key)
           JOIN statistics_current c USING (scope_kind, scope_id, key)
           UNION ALL
           SELECT scope_kind, scope_id, key, value_hash, version FROM statistics_current
           WHERE scope_kind = 'USER' AND scope_id = ANY($4::text[])""",
        [s[0] for s in slots],
        [s[1] for s in slots],
        [s[2] for s in slots],
        list(user_scopes),
    )
    return {(r["scope_kind"], r["scope_id"], r["key"]): Counted(r["value_hash"], r["version"]) for r in rows}


async def apply_plan(conn: asyncpg.Connection, plan: Plan) -> None:
    """Write a plan's deltas, counted rows, known users and daily rows (in the caller's transaction)."""
    values = plan.nonzero_values()
    distinct: dict[tuple[str, str], int] = {}
    if values:
        items = list(values.items())
        # Deltas go onto existing rows and missing rows are inserted, in one statement: the CHECK then
        # sees final holders only (INSERT .. ON CONFLICT would check a negative delta on its own).
        after = await conn.fetch(
            """WITH d AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                           AS d(key, scope_kind, value_hash, value_json, delta)),
                    updated AS (
                        UPDATE statistics_values t SET holders = t.holders + d.delta FROM d
                        WHERE t.key = d.key AND t.scope_kind = d.scope_kind AND t.value_hash = d.value_hash
                        RETURNING t.key, t.scope_kind, t.value_hash, t.holders),
                    inserted AS (
                        INSERT INTO statistics_values (key, scope_kind, value_hash, value_json, holders)
                        SELECT d.key, d.scope_kind, d.value_hash, d.value_json, d.delta FROM d
                        WHERE NOT EXISTS (SELECT 1 FROM statistics_values t WHERE t.key = d.key
                                          AND t.scope_kind = d.scope_kind AND t.value_hash = d.value_hash)
                        RETURNING key, scope_kind, value_hash, holders)
               SELECT * FROM updated UNION ALL SELECT * FROM inserted""",
            [k[0] for k, _ in items],
            [k[1] for k, _ in items],
            [k[2] for k, _ in items],
            [plan.value_json.get(k[2], "") for k, _ in items],
            [d for _, d in items],
        )
        distinct = distinct_deltas(values, {(r["key"], r["scope_kind"], r["value_hash"]): r["holders"] for r in after})
        await conn.execute(
            """DELETE FROM statistics_values v USING unnest($1::text[], $2::text[], $3::text[]) AS s(key, kind, hash)
               WHERE v.key = s.key AND v.scope_kind = s.kind AND v.value_hash = s.hash AND v.holders = 0""",
            [k[0] for k, _ in items],
            [k[1] for k, _ in items],
            [k[2] for k, _ in items],
        )
    holders = plan.nonzero_holders()
    keys = sorted(set(holders) | {k for k, d in distinct.items() if d})
    if keys:
        await conn.execute(
            """WITH d AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                           AS d(key, scope_kind, delta, distinct_delta)),
                    updated AS (
                        UPDATE statistics_keys t
                        SET holders = t.holders + d.delta, distinct_values = t.distinct_values + d.distinct_delta
                        FROM d WHERE t.key = d.key AND t.scope_kind = d.scope_kind RETURNING 1)
               INSERT INTO statistics_keys (key, scope_kind, holders, distinct_values)
               SELECT d.key, d.scope_kind, d.delta, d.distinct_delta FROM d
               WHERE NOT EXISTS (
                   SELECT 1 FROM statistics_keys t WHERE t.key = d.key AND t.scope_kind = d.scope_kind)""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [holders.get(k, 0) for k in keys],
            [distinct.get(k, 0) for k in keys],
        )
    await _write_counted(conn, plan)
    await _write_users(conn, plan)
    await _write_days(conn, plan)


async def _write_counted(conn: asyncpg.Connection, plan: Plan) -> None:
    if plan.counted:
        slots = list(plan.counted.items())
        await conn.execute(
            """INSERT INTO statistics_current AS c (scope_kind, scope_id, key, value_hash, version)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
               ON CONFLICT (scope_kind, scope_id, key) DO UPDATE
               SET value_hash = EXCLUDED.value_hash, version = EXCLUDED.version""",
            [s[0] for s, _ in slots],
            [s[1] for s, _ in slots],
            [s[2] for s, _ in slots],
            [c.value_hash for _, c in slots],
            [c.version for _, c in slots],
        )
    if plan.uncounted:
        gone = sorted(plan.uncounted)
        await conn.execute(
            """DELETE FROM statistics_current c USING unnest($1::text[], $2::text[], $3::text[]) AS s(kind, id, key)
               WHERE c.scope_kind = s.kind AND c.scope_id = s.id AND c.key = s.key""",
            [s[0] for s in gone],
            [s[1] for s in gone],
            [s[2] for s in gone],
        )


async def _write_users(conn: asyncpg.Connection, plan: Plan) -> None:
    if not plan.users_seen and not plan.users_erased:
        return
    await conn.execute(
        """WITH added AS (
               INSERT INTO statistics_users (user_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING 1),
           removed AS (DELETE FROM statistics_users WHERE user_id = ANY($2::text[]) RETURNING 1)
           UPDATE statistics_totals
           SET value = value + (SELECT count(*) FROM added) - (SELECT count(*) FROM removed)
           WHERE name = 'known_users'""",
        sorted(plan.users_seen - plan.users_erased),
        sorted(plan.users_erased),
    )


async def _write_days(conn: asyncpg.Connection, plan: Plan) -> None:
    pairs = sorted(set(plan.changes) | {(key, day) for key, day in plan.snapshot_days.items()})
    if not pairs:
        return
    await conn.execute(
        """INSERT INTO statistics_daily AS d (key, day, changes, holders, user_holders, top_value_json, top_holders)
           SELECT p.key, p.day, p.changes,
                  coalesce((SELECT holders FROM statistics_keys WHERE key = p.key AND scope_kind = '*'), 0),
                  coalesce((SELECT holders FROM statistics_keys WHERE key = p.key AND scope_kind = 'USER'), 0),
                  top.value_json, coalesce(top.holders, 0)
           FROM unnest($1::text[], $2::date[], $3::bigint[]) AS p(key, day, changes)
           LEFT JOIN LATERAL (
               SELECT value_json, holders FROM statistics_values
               WHERE key = p.key AND scope_kind = '*' ORDER BY holders DESC, value_hash LIMIT 1) top ON true
           ON CONFLICT (key, day) DO UPDATE
           SET changes = d.changes + EXCLUDED.changes, holders = EXCLUDED.holders,
               user_holders = EXCLUDED.user_holders, top_value_json = EXCLUDED.top_value_json,
               top_holders = EXCLUDED.top_holders""",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [plan.changes.get(p, 0) for p in pairs],
    )


async def reset(conn: asyncpg.Connection) -> None:
    """Forget every figure and move the position to the start of the feed (in the caller's transaction,
    after lock_position)."""
    await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    await conn.execute("UPDATE statistics_totals SET value = 0")
    await save_position(conn, FeedCursor(0, 0))


# --- reads ---------------------------------------------------------------------------------------

_POSITION = "(SELECT json_build_array(xid, change_id) FROM statistics_position)"


def _cursor(pair: list[int]) -> FeedCursor:
    return FeedCursor(pair[0], pair[1])


def _value(pair: list[Any] | None) -> ValueCount | None:
    return None if not pair or pair[0] is None else ValueCount(pair[0], pair[1])


async def key_figures(conn: asyncpg.Connection, key: str, kind: str, top_n: int) -> tuple[KeyFigures, FeedCursor]:
    """A key's holders per kind, its distinct values and top values at `kind`, and the position, in one
    statement (one snapshot)."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               (SELECT coalesce(json_object_agg(scope_kind, holders), '{{}}') FROM statistics_keys
                WHERE key = $1) AS holders,
               (SELECT distinct_values FROM statistics_keys WHERE key = $1 AND scope_kind = $2) AS distinct_values,
               (SELECT coalesce(json_agg(json_build_array(value_json, holders) ORDER BY holders DESC, value_hash), '[]')
                FROM (SELECT value_json, holders, value_hash FROM statistics_values
                      WHERE key = $1 AND scope_kind = $2 ORDER BY holders DESC, value_hash LIMIT $3) t) AS top""",
        key,
        kind,
        top_n,
    )
    top = [ValueCount(v, h) for v, h in row["top"]]
    return KeyFigures(dict(row["holders"]), row["distinct_values"] or 0, top), _cursor(row["position"])


async def popular_values(conn: asyncpg.Connection, keys: Sequence[str], kind: str) -> tuple[list[Popular], FeedCursor]:
    """Each key's holders at `kind` and most held value (in the order of `keys`), and the position."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               (SELECT coalesce(json_agg(json_build_array(q.key, coalesce(k.holders, 0),
                                                          json_build_array(top.value_json, top.holders))
                                         ORDER BY q.n), '[]')
                FROM unnest($1::text[]) WITH ORDINALITY AS q(key, n)
                LEFT JOIN statistics_keys k ON k.key = q.key AND k.scope_kind = $2
                LEFT JOIN LATERAL (
                    SELECT value_json, holders FROM statistics_values
                    WHERE key = q.key AND scope_kind = $2 ORDER BY holders DESC, value_hash LIMIT 1) top ON true
               ) AS keys""",
        list(keys),
        kind,
    )
    return [Popular(k, h, _value(top)) for k, h, top in row["keys"]], _cursor(row["position"])


async def adoption(conn: asyncpg.Connection, key: str, default: JsonValue) -> tuple[AdoptionFigures, FeedCursor]:
    """USER-scope holders of a key, those holding the default's value, known users, and the position."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               coalesce((SELECT holders FROM statistics_keys WHERE key = $1 AND scope_kind = 'USER'), 0) AS users,
               coalesce((SELECT holders FROM statistics_values WHERE key = $1 AND scope_kind = 'USER'
                         AND value_hash = md5($2::jsonb::text)), 0) AS at_default,
               (SELECT value FROM statistics_totals WHERE name = 'known_users') AS known""",
        key,
        default,
    )
    return AdoptionFigures(row["users"], row["at_default"], row["known"]), _cursor(row["position"])


async def daily_rows(
    conn: asyncpg.Connection, key: str, start: date, end: date
) -> tuple[list[DayRow], DayRow | None, FeedCursor]:
    """The stored daily rows of a key in [start, end], the last one before start, and the position."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               (SELECT coalesce(json_agg(json_build_array(day, changes, holders, user_holders, top_value_json,
                                                          top_holders) ORDER BY day), '[]')
                FROM statistics_daily WHERE key = $1 AND day BETWEEN $2 AND $3) AS rows,
               (SELECT json_build_array(day, changes, holders, user_holders, top_value_json, top_holders)
                FROM statistics_daily WHERE key = $1 AND day < $2 ORDER BY day DESC LIMIT 1) AS before""",
        key,
        start,
        end,
    )
    rows = [_day(r) for r in row["rows"]]
    before = _day(row["before"]) if row["before"] else None
    return rows, before, _cursor(row["position"])


def _day(r: list[Any]) -> DayRow:
    return DayRow(date.fromisoformat(r[0]), r[1], r[2], r[3], _value([r[4], r[5]]))
