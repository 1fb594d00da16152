"""SQL behind the statistics RPCs: one statement per answer (one snapshot), with the position it reflects."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.model import JsonValue
from prefd_server.statistics.model import AdoptionFigures, DayRow, KeyFigures, Popular, ValueCount

_POSITION = "(SELECT json_build_array(xid, change_id) FROM statistics_position)"


def _cursor(pair: list[int]) -> FeedCursor:
    return FeedCursor(pair[0], pair[1])


def _value(pair: list[Any] | None) -> ValueCount | None:
    return None if not pair or pair[0] is None else ValueCount(pair[0], pair[1])


async def key_figures(
    conn: asyncpg.Connection, key: str, org: str, kind: str, top_n: int
) -> tuple[KeyFigures, FeedCursor]:
    """A key's holders per kind, its distinct values and top values at `kind`, among the scopes of `org`
    (ALL_ORGS: every scope), and the position, in one statement (one snapshot)."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               (SELECT coalesce(json_object_agg(scope_kind, holders), '{{}}') FROM statistics_keys
                WHERE key = $1 AND org_id = $4) AS holders,
               (SELECT distinct_values FROM statistics_keys
                WHERE key = $1 AND org_id = $4 AND scope_kind = $2) AS distinct_values,
               (SELECT coalesce(json_agg(json_build_array(value_json, holders) ORDER BY holders DESC, value_hash), '[]')
                FROM (SELECT value_json, holders, value_hash FROM statistics_values
                      WHERE key = $1 AND org_id = $4 AND scope_kind = $2
                      ORDER BY holders DESC, value_hash LIMIT $3) t) AS top""",
        key,
        kind,
        top_n,
        org,
    )
    top = [ValueCount(v, h) for v, h in row["top"]]
    return KeyFigures(dict(row["holders"]), row["distinct_values"] or 0, top), _cursor(row["position"])


async def popular_values(
    conn: asyncpg.Connection, keys: Sequence[str], org: str, kind: str
) -> tuple[list[Popular], FeedCursor]:
    """Each key's holders at `kind` among the scopes of `org` (ALL_ORGS: every scope) and its most held
    value (in the order of `keys`), and the position."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               (SELECT coalesce(json_agg(json_build_array(q.key, coalesce(k.holders, 0),
                                                          json_build_array(top.value_json, top.holders))
                                         ORDER BY q.n), '[]')
                FROM unnest($1::text[]) WITH ORDINALITY AS q(key, n)
                LEFT JOIN statistics_keys k ON k.key = q.key AND k.org_id = $3 AND k.scope_kind = $2
                LEFT JOIN LATERAL (
                    SELECT value_json, holders FROM statistics_values
                    WHERE key = q.key AND org_id = $3 AND scope_kind = $2
                    ORDER BY holders DESC, value_hash LIMIT 1) top ON true
               ) AS keys""",
        list(keys),
        kind,
        org,
    )
    return [Popular(k, h, _value(top)) for k, h, top in row["keys"]], _cursor(row["position"])


async def adoption(conn: asyncpg.Connection, key: str, default: JsonValue) -> tuple[AdoptionFigures, FeedCursor]:
    """USER-scope holders of a key, those holding the default's value, known users, and the position."""
    row = await conn.fetchrow(
        f"""SELECT {_POSITION} AS position,
               coalesce((SELECT holders FROM statistics_keys
                         WHERE key = $1 AND org_id = '' AND scope_kind = 'USER'), 0) AS users,
               coalesce((SELECT holders FROM statistics_values WHERE key = $1 AND org_id = '' AND scope_kind = 'USER'
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
