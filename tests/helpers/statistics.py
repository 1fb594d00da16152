"""Statistics test helpers: wait until the consumer has counted every change, and compare what it keeps
with a GROUP BY over the stored overrides."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg

from prefd.v1 import statistics_pb2, statistics_pb2_grpc
from prefd_server.kernel.cursor import FeedCursor
from tests.helpers.auth import auth
from tests.helpers.requests import eventually, token_key

SERVICE = auth("service", sub="stats-reader")


async def last_change(db: asyncpg.Connection) -> FeedCursor:
    """The feed position of the newest change row."""
    row = await db.fetchrow("SELECT xid::text::bigint AS xid, id FROM changes ORDER BY xid DESC, id DESC LIMIT 1")
    return FeedCursor(row["xid"], row["id"]) if row else FeedCursor(0, 0)


async def counted_through(db: asyncpg.Connection, stats: statistics_pb2_grpc.StatisticsServiceStub) -> FeedCursor:
    """The position a statistics answer says it reflects (decoded from its cursor)."""
    answer = await stats.GetKeyStatistics(
        statistics_pb2.GetKeyStatisticsRequest(key="display.theme"), metadata=SERVICE, timeout=10
    )
    return FeedCursor.decode(answer.cursor.token, await token_key(db))


async def wait_counted(
    db: asyncpg.Connection, stats: statistics_pb2_grpc.StatisticsServiceStub, deadline_s: float = 30
) -> FeedCursor:
    """Wait until statistics answers reflect every change committed so far; their cursor then."""
    target = await last_change(db)
    reached = FeedCursor(0, 0)

    async def done() -> bool:
        nonlocal reached
        reached = await counted_through(db, stats)
        return reached >= target

    await eventually(done, deadline_s, interval_s=0.05)
    return reached


# The org a stored override counts in: an ORG scope's own, a USER override's latest change's, else none.
OVERRIDE_ORG = """CASE p.scope_kind WHEN 'ORG' THEN p.scope_id
    WHEN 'USER' THEN (SELECT c.org_id FROM changes c
                      WHERE c.kind = 'preference'
                        AND (c.scope_kind, c.scope_id, c.key) = (p.scope_kind, p.scope_id, p.key)
                      ORDER BY c.xid DESC, c.id DESC LIMIT 1)
    ELSE '' END"""
# The value an override counts: a policy's own value, anything else as stored.
COUNTED_VALUE = """CASE WHEN jsonb_typeof(p.value) = 'object' AND p.value ? '$policy'
    THEN p.value -> '$policy' -> 'value' ELSE p.value END"""


async def truth(db: asyncpg.Connection) -> dict[str, Any]:
    """What the statistics must say, by GROUP BY over preference_values (the seed's way), among every
    scope (org '') and within each org."""
    sensitive = {r["key"] for r in await db.fetch("SELECT key FROM definitions WHERE sensitive")}
    rows = await db.fetch(
        f"""SELECT key, scope_kind, org, value, count(*) AS n
            FROM (SELECT p.key, p.scope_kind, {OVERRIDE_ORG} AS org, ({COUNTED_VALUE})::text AS value
                  FROM preference_values p WHERE p.value IS NOT NULL) o
            GROUP BY key, scope_kind, org, value"""
    )
    holders: Counter[tuple[str, str, str]] = Counter()
    values: Counter[tuple[str, str, str, str]] = Counter()
    for r in rows:
        for org in {"", r["org"]}:
            for kind in (r["scope_kind"], "*"):
                holders[(r["key"], org, kind)] += r["n"]
                if r["key"] not in sensitive:
                    values[(r["key"], org, kind, r["value"])] += r["n"]
    known = await db.fetchval("SELECT count(DISTINCT scope_id) FROM preference_values WHERE scope_kind = 'USER'")
    return {"holders": holders, "values": values, "known_users": known, "sensitive": sensitive}


async def kept(db: asyncpg.Connection) -> dict[str, Any]:
    """What the statistics keep, in the shape of truth()."""
    holders = Counter(
        {
            (r["key"], r["org_id"], r["scope_kind"]): r["holders"]
            for r in await db.fetch("SELECT * FROM statistics_keys")
            if r["holders"]
        }
    )
    values = Counter(
        {
            (r["key"], r["org_id"], r["scope_kind"], r["value_json"]): r["holders"]
            for r in await db.fetch("SELECT * FROM statistics_values")
        }
    )
    known = await db.fetchval("SELECT value FROM statistics_totals WHERE name = 'known_users'")
    return {"holders": holders, "values": values, "known_users": known}


async def assert_statistics_match_the_database(db: asyncpg.Connection) -> dict[str, Any]:
    """The kept figures equal the GROUP BY; distinct-value counts equal the values kept; returns the truth."""
    expected, actual = await truth(db), await kept(db)
    assert actual["known_users"] == expected["known_users"]
    assert actual["holders"] == expected["holders"], _diff(actual["holders"], expected["holders"])
    assert actual["values"] == expected["values"], _diff(actual["values"], expected["values"])
    assert not any(key in expected["sensitive"] for key, _, _, _ in actual["values"]), "a sensitive value was kept"
    distinct = Counter((key, org, kind) for key, org, kind, _ in expected["values"])
    stored = {
        (r["key"], r["org_id"], r["scope_kind"]): r["distinct_values"]
        for r in await db.fetch("SELECT * FROM statistics_keys WHERE distinct_values > 0")
    }
    assert stored == dict(distinct)
    return expected


def _diff(actual: Counter[Any], expected: Counter[Any]) -> str:
    wrong = {
        k: (actual.get(k), expected.get(k)) for k in set(actual) | set(expected) if actual.get(k) != expected.get(k)
    }
    return f"{len(wrong)} differ (kept, truth): {dict(list(wrong.items())[:10])}"
