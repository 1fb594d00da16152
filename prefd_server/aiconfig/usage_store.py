"""The usage ledger: one row per generation, per-period totals and threshold crossings, in one transaction."""

from __future__ import annotations

from datetime import date, datetime

import asyncpg

from prefd_server.aiconfig import store as ai_sql
from prefd_server.aiconfig.model import ModelInfo
from prefd_server.aiconfig.usage import (
    PERIODS,
    Budgets,
    Crossing,
    Generation,
    UsageRecord,
    check_replay,
    crossed,
    period_starts,
)
from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import invalid
from prefd_server.kernel.model import CallInfo, ChangeKind, Scope, ScopeKind, Subject


async def record(
    pool: asyncpg.Pool, generation: Generation, budgets: Budgets, call: CallInfo
) -> tuple[UsageRecord, int | None]:
    """Append a ledger row unless request_id is recorded already (same figures: replay; else INVALID_ARGUMENT).

    Returns the record and the xid of the transaction when it appended threshold crossings.
    """
    subject, request_id = generation.subject, generation.request_id
    async with translated_errors(), pool.acquire() as conn, conn.transaction():
        catalog = await ai_sql.models(conn)
        info: ModelInfo | None = catalog.get(generation.model)
        if info is None:
            raise invalid("model", f"model {generation.model!r} is not in the catalog")
        input_cost, output_cost = info.cost(generation.input_tokens, generation.output_tokens)
        cost = input_cost + output_cost
        row = await conn.fetchrow(
            """INSERT INTO ai_usage (request_id, user_id, org_id, model, input_tokens, output_tokens, cost_nanos, actor)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (request_id) DO NOTHING
               RETURNING recorded_at""",
            request_id,
            subject.user_id,
            subject.org_id,
            generation.model,
            generation.input_tokens,
            generation.output_tokens,
            cost,
            call.actor,
        )
        if row is None:
            return await _replay(conn, generation), None
        recorded_at: datetime = row["recorded_at"]
        starts = period_starts(recorded_at)
        totals: dict[str, tuple[date, int]] = {}
        crossings: list[Crossing] = []
        for period in PERIODS:
            total: int = await conn.fetchval(
                """INSERT INTO ai_usage_totals (user_id, period, period_start, cost_nanos) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (user_id, period, period_start)
                   DO UPDATE SET cost_nanos = ai_usage_totals.cost_nanos + EXCLUDED.cost_nanos
                   RETURNING cost_nanos""",
                subject.user_id,
                period,
                starts[period],
                cost,
            )
            totals[period] = (starts[period], total)
            budget = budgets.nanos[period]
            for threshold in crossed(total - cost, total, budget, budgets.thresholds):
                crossings.append(
                    Crossing(period, threshold, starts[period], total, budget, subject.user_id, request_id)
                )
        xid = None
        for crossing in crossings:
            xid = await feed_sql.append_change(
                conn,
                ChangeKind.BUDGET,
                Scope(ScopeKind.USER, subject.user_id),
                f"budget/{crossing.period}",
                None,
                crossing.document(),
                0,
                call,
                "budget threshold crossed",
            )
    return UsageRecord(cost, True, recorded_at, totals, crossings), xid


async def _replay(conn: asyncpg.Connection, generation: Generation) -> UsageRecord:
    """The record of a request_id reported before, if this report carries the same figures."""
    first = await conn.fetchrow(
        """SELECT user_id, org_id, model, input_tokens, output_tokens, cost_nanos, recorded_at
           FROM ai_usage WHERE request_id = $1""",
        generation.request_id,
    )
    recorded = Generation(
        Subject(first["user_id"], first["org_id"]),
        first["model"],
        first["input_tokens"],
        first["output_tokens"],
        generation.request_id,
    )
    check_replay(generation, recorded)
    return UsageRecord(first["cost_nanos"], False, first["recorded_at"], {}, [])


async def totals(pool: asyncpg.Pool, user_id: str, starts: dict[str, date]) -> dict[str, int]:
    """The user's spend (nano-USD) in each of the given periods."""
    async with translated_errors(), pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT t.period, t.cost_nanos FROM ai_usage_totals t
               JOIN unnest($2::text[], $3::date[]) AS p(period, start)
                 ON p.period = t.period AND p.start = t.period_start
               WHERE t.user_id = $1""",
            user_id,
            list(starts),
            list(starts.values()),
        )
    found = {period: 0 for period in starts}
    found.update({row["period"]: row["cost_nanos"] for row in rows})
    return found
