"""SQL of the statistics consumer: the runner and apply locks, its position, reading the feed and the
figures a batch touches, writing a batch's figures in one statement, the daily rows, and the reset."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.statistics.model import Counted
from prefd_server.statistics.rules import FeedRow, Group, GroupValue, Plan, Slot, Writes

# pg_advisory_lock key held by the one statistics runner across processes ("prefdst" in ASCII).
RUNNER_LOCK_KEY = 0x70726566647374
# pg_advisory_xact_lock key every writer of the statistics (a batch, an erasure, a reset) holds until its
# transaction ends ("prefdsa"). Unlike a row lock it takes no transaction id, so a batch reads everything
# first and holds back the change feed's horizon only for its one writing statement.
APPLY_LOCK_KEY = 0x70726566647361

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


async def lock_apply(conn: asyncpg.Connection) -> tuple[FeedCursor, int]:
    """Take the apply lock for the transaction, then read the position and the feed horizon (both after
    the lock: what an earlier holder committed is seen, and every transaction below the horizon has
    finished)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", APPLY_LOCK_KEY)
    row = await conn.fetchrow(
        """SELECT xid, change_id, pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon
           FROM statistics_position"""
    )
    return FeedCursor(row["xid"], row["change_id"]), row["horizon"]


# The value a change counts: a policy ({"$policy": {"value": ...}}) by the value it sets, anything else
# (a rollout too: {"$rollout": ...}) as stored. The org it counts in: an ORG change's own org, a USER
# change's recorded org.
READ_CHANGES = """SELECT id, xid::text::bigint AS xid, kind, scope_kind, scope_id, key, version,
           counted::text AS value_json, md5(counted::text) AS value_hash,
           (created_at AT TIME ZONE 'UTC')::date AS day,
           CASE scope_kind WHEN 'ORG' THEN scope_id WHEN 'USER' THEN org_id ELSE '' END AS org_id
    FROM changes,
         LATERAL (SELECT CASE WHEN jsonb_typeof(new_value) = 'object' AND new_value ? '$policy'
                              THEN new_value -> '$policy' -> 'value' ELSE new_value END AS counted) AS v
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
            r["org_id"],
        )
        for r in rows
    ]


async def counted_rows(
    conn: asyncpg.Connection, slots: Sequence[Slot], user_scopes: Sequence[str]
) -> dict[Slot, Counted]:
    """The counted value of each slot that has one, and of every key of the given USER scopes."""
    rows = await conn.fetch(
        """SELECT c.scope_kind, c.scope_id, c.key, c.value_hash, c.version, c.org_id
           FROM unnest($1::text[], $2::text[], $3::text[]) AS s(scope_kind, scope_id, key)
           JOIN statistics_current c USING (scope_kind, scope_id, key)
           UNION ALL
           SELECT scope_kind, scope_id, key, value_hash, version, org_id FROM statistics_current
           WHERE scope_kind = 'USER' AND scope_id = ANY($4::text[])""",
        [s[0] for s in slots],
        [s[1] for s in slots],
        [s[2] for s in slots],
        list(user_scopes),
    )
    return {
        (r["scope_kind"], r["scope_id"], r["key"]): Counted(r["value_hash"], r["version"], r["org_id"]) for r in rows
    }


async def touched_figures(
    conn: asyncpg.Connection, plan: Plan
) -> tuple[dict[GroupValue, int], dict[Group, tuple[int, int]]]:
    """The holders of every value row a plan changes that exists, and the (holders, distinct values) of
    every key row it changes that exists."""
    values = list(plan.nonzero_values())
    groups = sorted(set(plan.holders) | {(k, org, kind) for k, org, kind, _ in values})
    row = await conn.fetchrow(
        """SELECT
               (SELECT coalesce(json_agg(json_build_array(v.key, v.org_id, v.scope_kind, v.value_hash, v.holders)),
                                '[]')
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS s(key, org_id, scope_kind, value_hash)
                JOIN statistics_values v USING (key, org_id, scope_kind, value_hash)) AS values,
               (SELECT coalesce(json_agg(json_build_array(k.key, k.org_id, k.scope_kind, k.holders,
                                                          k.distinct_values)), '[]')
                FROM unnest($5::text[], $6::text[], $7::text[]) AS s(key, org_id, scope_kind)
                JOIN statistics_keys k USING (key, org_id, scope_kind)) AS keys""",
        *_columns(values, 4),
        *_columns(groups, 3),
    )
    return (
        {(k, org, kind, h): n for k, org, kind, h, n in row["values"]},
        {(k, org, kind): (n, d) for k, org, kind, n, d in row["keys"]},
    )


WRITE = """WITH
    v_updated AS (
        UPDATE statistics_values t SET holders = u.holders
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
             AS u(key, org_id, scope_kind, value_hash, holders)
        WHERE (t.key, t.org_id, t.scope_kind, t.value_hash) = (u.key, u.org_id, u.scope_kind, u.value_hash)
        RETURNING 1),
    v_inserted AS (
        INSERT INTO statistics_values (key, org_id, scope_kind, value_hash, value_json, holders)
        SELECT * FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[]) RETURNING 1),
    v_deleted AS (
        DELETE FROM statistics_values t
        USING unnest($12::text[], $13::text[], $14::text[], $15::text[]) AS d(key, org_id, kind, hash)
        WHERE (t.key, t.org_id, t.scope_kind, t.value_hash) = (d.key, d.org_id, d.kind, d.hash) RETURNING 1),
    k_updated AS (
        UPDATE statistics_keys t SET holders = u.holders, distinct_values = u.distinct_values
        FROM unnest($16::text[], $17::text[], $18::text[], $19::bigint[], $20::bigint[])
             AS u(key, org_id, scope_kind, holders, distinct_values)
        WHERE (t.key, t.org_id, t.scope_kind) = (u.key, u.org_id, u.scope_kind) RETURNING 1),
    k_inserted AS (
        INSERT INTO statistics_keys (key, org_id, scope_kind, holders, distinct_values)
        SELECT * FROM unnest($21::text[], $22::text[], $23::text[], $24::bigint[], $25::bigint[]) RETURNING 1),
    c_written AS (
        INSERT INTO statistics_current AS c (scope_kind, scope_id, key, value_hash, version, org_id)
        SELECT * FROM unnest($26::text[], $27::text[], $28::text[], $29::text[], $30::bigint[], $31::text[])
        ON CONFLICT (scope_kind, scope_id, key) DO UPDATE
        SET value_hash = EXCLUDED.value_hash, version = EXCLUDED.version, org_id = EXCLUDED.org_id RETURNING 1),
    c_deleted AS (
        DELETE FROM statistics_current c USING unnest($32::text[], $33::text[], $34::text[]) AS d(kind, id, key)
        WHERE c.scope_kind = d.kind AND c.scope_id = d.id AND c.key = d.key RETURNING 1),
    u_added AS (
        INSERT INTO statistics_users (user_id) SELECT unnest($35::text[]) ON CONFLICT DO NOTHING RETURNING 1),
    u_removed AS (DELETE FROM statistics_users WHERE user_id = ANY($36::text[]) RETURNING 1),
    known AS (
        UPDATE statistics_totals SET value = value + (SELECT count(*) FROM u_added) - (SELECT count(*) FROM u_removed)
        WHERE name = 'known_users' RETURNING 1),
    moved AS (
        UPDATE statistics_position SET xid = $37, change_id = $38, updated_at = now()
        WHERE $39 RETURNING 1)
SELECT 1"""


async def write(conn: asyncpg.Connection, plan: Plan, writes: Writes, position: FeedCursor | None) -> None:
    """Every figure a plan changes, its counted rows, known users and (unless None) the new position, in
    one statement: the transaction takes its id here, so the feed horizon waits for this statement only."""
    c_rows = list(plan.counted.items())
    gone = sorted(plan.uncounted)
    await conn.execute(
        WRITE,
        *_columns(writes.values_updated, 5),
        *_columns(writes.values_inserted, 6),
        *_columns(writes.values_deleted, 4),
        *_columns(writes.keys_updated, 5),
        *_columns(writes.keys_inserted, 5),
        [s[0] for s, _ in c_rows],
        [s[1] for s, _ in c_rows],
        [s[2] for s, _ in c_rows],
        [c.value_hash for _, c in c_rows],
        [c.version for _, c in c_rows],
        [c.org_id for _, c in c_rows],
        [s[0] for s in gone],
        [s[1] for s in gone],
        [s[2] for s in gone],
        sorted(plan.users_seen - plan.users_erased),
        sorted(plan.users_erased),
        position.xid if position else 0,
        position.change_id if position else 0,
        position is not None,
    )


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    return [[row[i] for row in rows] for i in range(width)]


async def write_days(conn: asyncpg.Connection, plan: Plan) -> None:
    """Add the plan's changes to their days' rows and snapshot each touched key's holders and most
    common value into its row (after write(), in the same transaction)."""
    pairs = sorted(set(plan.changes) | set(plan.snapshot_days.items()))
    if not pairs:
        return
    await conn.execute(
        """INSERT INTO statistics_daily AS d (key, day, changes, holders, user_holders, top_value_json, top_holders)
           SELECT p.key, p.day, p.changes,
                  coalesce((SELECT holders FROM statistics_keys
                            WHERE key = p.key AND org_id = '' AND scope_kind = '*'), 0),
                  coalesce((SELECT holders FROM statistics_keys
                            WHERE key = p.key AND org_id = '' AND scope_kind = 'USER'), 0),
                  top.value_json, coalesce(top.holders, 0)
           FROM unnest($1::text[], $2::date[], $3::bigint[]) AS p(key, day, changes)
           LEFT JOIN LATERAL (
               SELECT value_json, holders FROM statistics_values
               WHERE key = p.key AND org_id = '' AND scope_kind = '*'
               ORDER BY holders DESC, value_hash LIMIT 1) top ON true
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
    after lock_apply)."""
    await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    await conn.execute("UPDATE statistics_totals SET value = 0")
    await conn.execute("UPDATE statistics_position SET xid = 0, change_id = 0, updated_at = now()")
