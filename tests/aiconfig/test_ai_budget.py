"""AIConfigService catalog, cost estimates, the usage ledger, budgets and threshold events."""

from __future__ import annotations

import asyncio
import math
import os
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import common_pb2
from tests.helpers.aiconfig import (
    ADMIN,
    HAIKU,
    OPUS,
    SMALL_BUDGET,
    SONNET,
    configuration,
    create_config,
    get_effective,
    provenance_tuple,
    row_counts,
    usage,
)
from tests.helpers.auth import auth, unique
from tests.helpers.requests import error_reason, field_violations

SERVICE = auth("service", "generator")
NANOS = 1_000_000_000


# A small budget: thresholds at 0.5 and 0.9 of one cent a day.
async def estimate(ai_stub, model: str, input_tokens: int, output_tokens: int) -> ai.EstimateCostResponse:
    return await ai_stub.EstimateCost(
        ai.EstimateCostRequest(model=model, input_tokens=input_tokens, output_tokens=output_tokens),
        metadata=auth("user", unique("u")),
    )


async def budget_status(ai_stub, user_id: str, org_id: str = "", metadata: Any = ADMIN) -> list[ai.BudgetPeriodStatus]:
    reply = await ai_stub.GetBudgetStatus(
        ai.GetBudgetStatusRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id)), metadata=metadata
    )
    return list(reply.periods)


async def add_model(ai_stub, **fields: Any) -> ai.AIModel:
    """A catalog model no other test uses (the seeded ones stay untouched)."""
    model = ai.AIModel(model=unique("test-model-"), context_window=100_000, output_limit=8000, **fields)
    return (await ai_stub.UpdateModel(ai.UpdateModelRequest(model=model), metadata=ADMIN)).model


def watch_request(user_id: str, org_id: str = "") -> ai.WatchAIConfigRequest:
    return ai.WatchAIConfigRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id))


async def budget_events_until_config_change(call: Any, config_id: str, deadline_s: float = 15) -> list[ai.BudgetEvent]:
    """Every `budget` message before the config_changed of `config_id` at a version past its creation
    (the sentinel write made after the records, so feed order puts every budget event before it; a
    watch opened right after the creation may still deliver the creation itself first)."""
    events: list[ai.BudgetEvent] = []
    async with asyncio.timeout(deadline_s):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "stream ended"
            kind = message.WhichOneof("message")
            assert kind != "compacted"
            if kind == "budget":
                events.append(message.budget)
            elif (
                kind == "config_changed"
                and message.config_changed.config_id == config_id
                and message.config_changed.version > 1
            ):
                return events


async def touch(ai_stub, config_id: str, temperature: float) -> None:
    """A sentinel write to a config in the watched chain."""
    await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(
            config=ai.AIConfig(id=config_id, configuration=configuration({"model.temperature": temperature}))
        ),
        metadata=ADMIN,
    )


def utc_period_starts(now: datetime) -> list[datetime]:
    day = now.astimezone(UTC).date()
    starts = [day, day - timedelta(days=day.weekday()), day.replace(day=1)]
    return [datetime(d.year, d.month, d.day, tzinfo=UTC) for d in starts]


# --- catalog -----------------------------------------------------------------------------------


async def test_list_models_has_the_seeded_catalog(ai_stub) -> None:
    reply = await ai_stub.ListModels(ai.ListModelsRequest(), metadata=auth("user", unique("u")))
    ids = [m.model for m in reply.models]
    assert ids == sorted(ids)
    seeded = {m.model: m for m in reply.models if m.model in (HAIKU, OPUS, SONNET)}
    got = {
        name: (m.context_window, m.output_limit, m.input_usd_per_1k, m.output_usd_per_1k, list(m.features))
        for name, m in seeded.items()
    }
    assert got == {
        HAIKU: (200000, 4096, 0.00025, 0.00125, ["text", "vision"]),
        OPUS: (200000, 4096, 0.015, 0.075, ["text", "vision", "tool_use"]),
        SONNET: (200000, 4096, 0.003, 0.015, ["text", "vision", "tool_use"]),
    }
    assert all(m.version >= 1 for m in seeded.values())


@pytest.mark.parametrize(
    ("model", "input_tokens", "output_tokens", "parts"),
    [
        (HAIKU, 1000, 1000, (250_000, 1_250_000)),
        (OPUS, 1000, 1000, (15_000_000, 75_000_000)),
        (SONNET, 2000, 500, (6_000_000, 7_500_000)),
        (HAIKU, 1, 3, (250, 3_750)),
        (SONNET, 0, 0, (0, 0)),
    ],
)
async def test_estimate_cost_from_the_seeded_prices(ai_stub, model, input_tokens, output_tokens, parts) -> None:
    reply = await estimate(ai_stub, model, input_tokens, output_tokens)
    assert (reply.input_cost_nanos, reply.output_cost_nanos) == parts
    assert reply.cost_nanos == sum(parts)
    assert math.isclose(reply.cost_usd, sum(parts) / NANOS, rel_tol=1e-12, abs_tol=1e-18)


async def test_each_part_of_an_estimate_is_rounded_half_up(ai_stub) -> None:
    # 1 and 3 nano-USD per 1,000 tokens: 500 tokens are 0.5 and 1.5 nanos.
    model = await add_model(ai_stub, input_usd_per_1k=1e-9, output_usd_per_1k=3e-9)
    half = await estimate(ai_stub, model.model, 500, 500)
    # Rounded per part (1 + 2), not as a whole (0.5 + 1.5 = 2).
    assert (half.input_cost_nanos, half.output_cost_nanos, half.cost_nanos) == (1, 2, 3)
    below = await estimate(ai_stub, model.model, 499, 166)
    assert (below.input_cost_nanos, below.output_cost_nanos, below.cost_nanos) == (0, 0, 0)
    above = await estimate(ai_stub, model.model, 1500, 167)
    assert (above.input_cost_nanos, above.output_cost_nanos) == (2, 1)


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"model": "no-such-model", "input_tokens": 1}, "model"),
        ({"model": HAIKU, "input_tokens": -1}, "input_tokens"),
        ({"model": HAIKU, "output_tokens": -5}, "output_tokens"),
    ],
)
async def test_estimate_cost_refuses_unknown_models_and_negative_counts(ai_stub, request_kwargs, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.EstimateCost(ai.EstimateCostRequest(**request_kwargs), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)


async def test_update_model_creates_and_replaces_and_estimates_follow(ai_stub, db) -> None:
    name = unique("test-model-")
    first = await ai_stub.UpdateModel(
        ai.UpdateModelRequest(
            model=ai.AIModel(
                model=name,
                context_window=32000,
                output_limit=2000,
                input_usd_per_1k=0.001,
                output_usd_per_1k=0.002,
                features=["text"],
            ),
            reason="new model",
        ),
        metadata=ADMIN,
    )
    assert (first.model.model, first.model.version, first.model.output_limit) == (name, 1, 2000)
    listed = {m.model: m for m in (await ai_stub.ListModels(ai.ListModelsRequest(), metadata=SERVICE)).models}
    assert (listed[name].input_usd_per_1k, listed[name].output_usd_per_1k, list(listed[name].features)) == (
        0.001,
        0.002,
        ["text"],
    )
    cost = await estimate(ai_stub, name, 1000, 1000)
    assert (cost.input_cost_nanos, cost.output_cost_nanos) == (1_000_000, 2_000_000)

    second = await ai_stub.UpdateModel(
        ai.UpdateModelRequest(
            model=ai.AIModel(
                model=name, context_window=32000, output_limit=1000, input_usd_per_1k=0.01, output_usd_per_1k=0.05
            )
        ),
        metadata=ADMIN,
    )
    assert (second.model.version, second.model.input_usd_per_1k) == (2, 0.01)
    cost = await estimate(ai_stub, name, 1000, 1000)
    assert (cost.input_cost_nanos, cost.output_cost_nanos, cost.cost_nanos) == (10_000_000, 50_000_000, 60_000_000)
    # Usage is priced from the catalog too.
    uid = unique("u")
    recorded = await ai_stub.RecordUsage(usage(uid, unique("r"), name, 500, 100), metadata=SERVICE)
    assert recorded.cost_nanos == 5_000_000 + 5_000_000
    rows = await db.fetch("SELECT kind, key, version FROM changes WHERE key = $1 ORDER BY id", f"ai_model/{name}")
    assert [(r["kind"], r["key"], r["version"]) for r in rows] == [
        ("ai_model", f"ai_model/{name}", 1),
        ("ai_model", f"ai_model/{name}", 2),
    ]


BAD_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "context window 0": ({"context_window": 0}, "model.context_window"),
    "output limit 0": ({"output_limit": 0}, "model.output_limit"),
    "output limit above the context window": ({"context_window": 1000, "output_limit": 1001}, "model.output_limit"),
    "negative input price": ({"input_usd_per_1k": -0.001}, "model.input_usd_per_1k"),
    "negative output price": ({"output_usd_per_1k": -1.0}, "model.output_usd_per_1k"),
    "NaN price": ({"input_usd_per_1k": math.nan}, "model.input_usd_per_1k"),
    "infinite price": ({"output_usd_per_1k": math.inf}, "model.output_usd_per_1k"),
    "malformed model id": ({"model": "has space/and slash"}, "model.model"),
    "empty model id": ({"model": ""}, "model.model"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
async def test_out_of_range_model_figures_are_refused(ai_stub, db, case) -> None:
    overrides, field = BAD_MODELS[case]
    fields: dict[str, Any] = {
        "model": unique("test-model-"),
        "context_window": 4000,
        "output_limit": 1000,
        "input_usd_per_1k": 0.001,
        "output_usd_per_1k": 0.002,
        **overrides,
    }
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateModel(ai.UpdateModelRequest(model=ai.AIModel(**fields)), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert await row_counts(db) == before


async def test_configs_are_checked_against_a_new_models_output_limit(ai_stub, db) -> None:
    model = await add_model(ai_stub, input_usd_per_1k=0.001)
    uid = unique("u")
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, user_id=uid, values={"model.model": model.model, "model.max_tokens": 8001})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.configuration.model.max_tokens" in field_violations(err.value)
    assert await row_counts(db) == before
    config = await create_config(ai_stub, user_id=uid, values={"model.model": model.model, "model.max_tokens": 8000})
    reply = await get_effective(ai_stub, uid)
    assert (reply.configuration.model.model, reply.configuration.model.max_tokens) == (model.model, 8000)
    assert list(reply.violations) == []

    # A catalog change can invalidate the chain afterwards: the effective read reports it.
    await ai_stub.UpdateModel(
        ai.UpdateModelRequest(
            model=ai.AIModel(model=model.model, context_window=100_000, output_limit=4000, input_usd_per_1k=0.001)
        ),
        metadata=ADMIN,
    )
    reply = await get_effective(ai_stub, uid)
    assert len(reply.violations) == 1
    violation = reply.violations[0]
    assert violation.field in ("configuration.model.max_tokens", "configuration.model.model")
    assert violation.source.config_id == config.id
    assert provenance_tuple(violation.source) == provenance_tuple(
        reply.provenance[violation.field.removeprefix("configuration.")]
    )


# --- usage: idempotency, bad input ---------------------------------------------------------------


async def test_record_usage_is_idempotent_per_request_id(ai_stub, db) -> None:
    uid, request_id = unique("u"), unique("req-")
    cost = await estimate(ai_stub, SONNET, 1234, 567)
    first = await ai_stub.RecordUsage(usage(uid, request_id, SONNET, 1234, 567), metadata=SERVICE)
    assert (first.recorded, first.cost_nanos) == (True, cost.cost_nanos)
    assert math.isclose(first.cost_usd, cost.cost_nanos / NANOS, rel_tol=1e-12)
    before = await row_counts(db)
    again = await ai_stub.RecordUsage(usage(uid, request_id, SONNET, 1234, 567), metadata=ADMIN)
    assert (again.recorded, again.cost_nanos, list(again.crossed)) == (False, cost.cost_nanos, [])
    assert again.record_time == first.record_time
    assert await row_counts(db) == before
    rows = await db.fetch(
        "SELECT user_id, model, input_tokens, output_tokens, cost_nanos FROM ai_usage WHERE request_id = $1", request_id
    )
    assert [tuple(r) for r in rows] == [(uid, SONNET, 1234, 567, cost.cost_nanos)]
    periods = await budget_status(ai_stub, uid)
    assert [p.spent_nanos for p in periods] == [cost.cost_nanos] * 3


async def test_one_request_id_raced_by_many_callers_is_recorded_once(ai_stub, db) -> None:
    uid, request_id = unique("u"), unique("req-")
    replies = await asyncio.gather(
        *(ai_stub.RecordUsage(usage(uid, request_id, HAIKU, 4000, 2000), metadata=SERVICE) for _ in range(50))
    )
    assert sum(r.recorded for r in replies) == 1
    assert len({r.cost_nanos for r in replies}) == 1
    assert await db.fetchval("SELECT count(*) FROM ai_usage WHERE request_id = $1", request_id) == 1
    periods = await budget_status(ai_stub, uid)
    assert periods[0].spent_nanos == replies[0].cost_nanos


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"input_tokens": 1001}, "input_tokens"),
        ({"output_tokens": 999}, "output_tokens"),
        ({"model": OPUS}, "model"),
    ],
)
async def test_a_reused_request_id_with_other_figures_is_refused(ai_stub, db, changed, field) -> None:
    uid, request_id = unique("u"), unique("req-")
    first = await ai_stub.RecordUsage(usage(uid, request_id), metadata=SERVICE)
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.RecordUsage(usage(uid, request_id, **changed), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "REQUEST_ID_REUSED"
    assert list(field_violations(err.value)) == [field]
    assert await row_counts(db) == before
    assert (await budget_status(ai_stub, uid))[0].spent_nanos == first.cost_nanos


async def test_a_reused_request_id_for_another_user_is_refused(ai_stub, db) -> None:
    uid, other, request_id = unique("u"), unique("u"), unique("req-")
    await ai_stub.RecordUsage(usage(uid, request_id), metadata=SERVICE)
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.RecordUsage(usage(other, request_id), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "REQUEST_ID_REUSED"
    assert await row_counts(db) == before
    assert (await budget_status(ai_stub, other))[0].spent_nanos == 0


BAD_USAGE: dict[str, tuple[dict[str, Any], str]] = {
    "negative input tokens": ({"input_tokens": -1}, "input_tokens"),
    "negative output tokens": ({"output_tokens": -10}, "output_tokens"),
    "unknown model": ({"model": "no-such-model"}, "model"),
    "empty request id": ({"request_id": ""}, "request_id"),
    "request id over 128 characters": ({"request_id": "r" * 129}, "request_id"),
}


@pytest.mark.parametrize("case", list(BAD_USAGE))
async def test_bad_usage_is_refused_and_writes_nothing(ai_stub, db, case) -> None:
    overrides, field = BAD_USAGE[case]
    uid = unique("u")
    request = usage(uid, unique("req-"))
    for name, value in overrides.items():
        setattr(request, name, value)
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.RecordUsage(request, metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert await row_counts(db) == before


async def test_record_usage_needs_the_service_or_admin_role(ai_stub, db) -> None:
    uid = unique("u")
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.RecordUsage(usage(uid, unique("req-")), metadata=auth("user", uid))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await row_counts(db) == before
    assert (await ai_stub.RecordUsage(usage(uid, unique("req-")), metadata=ADMIN)).recorded
    assert (await ai_stub.RecordUsage(usage(uid, unique("req-")), metadata=SERVICE)).recorded
    # The user reads its own budget, not another's.
    mine = await budget_status(ai_stub, uid, metadata=auth("user", uid))
    assert mine[0].spent_nanos == 2 * (await estimate(ai_stub, HAIKU, 1000, 1000)).cost_nanos
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await budget_status(ai_stub, unique("u"), metadata=auth("user", uid))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- concurrent usage and budgets ----------------------------------------------------------------


async def test_concurrent_usage_of_one_user_sums_exactly(ai_stub, db) -> None:
    uid, oid = unique("u"), unique("o")
    models = (HAIKU, OPUS, SONNET)
    calls = [(models[i % 3], 37 * i + 1, 11 * i + 3, unique(f"req{i}-")) for i in range(60)]
    estimates = await asyncio.gather(*(estimate(ai_stub, m, i, o) for m, i, o, _ in calls))
    replies = await asyncio.gather(
        *(ai_stub.RecordUsage(usage(uid, r, m, i, o, oid), metadata=SERVICE) for m, i, o, r in calls)
    )
    assert all(r.recorded for r in replies)
    assert [r.cost_nanos for r in replies] == [e.cost_nanos for e in estimates]
    expected = sum(e.cost_nanos for e in estimates)
    ledger = await db.fetchval("SELECT sum(cost_nanos) FROM ai_usage WHERE user_id = $1", uid)
    assert ledger == expected
    assert await db.fetchval("SELECT count(*) FROM ai_usage WHERE user_id = $1", uid) == len(calls)
    periods = await budget_status(ai_stub, uid, oid)
    assert [p.period for p in periods] == [ai.BUDGET_PERIOD_DAILY, ai.BUDGET_PERIOD_WEEKLY, ai.BUDGET_PERIOD_MONTHLY]
    for status in periods:
        start = status.period_start.ToDatetime(tzinfo=UTC)
        since = await db.fetchval(
            "SELECT coalesce(sum(cost_nanos), 0) FROM ai_usage WHERE user_id = $1 AND recorded_at >= $2", uid, start
        )
        assert status.spent_nanos == since
        assert math.isclose(status.spent_usd, status.spent_nanos / NANOS, rel_tol=1e-12)
    # Every record of this test falls in the current day unless it ran across UTC midnight.
    first_day = (await db.fetchval("SELECT min(recorded_at) FROM ai_usage WHERE user_id = $1", uid)).astimezone(UTC)
    if first_day.date() == periods[0].period_start.ToDatetime(tzinfo=UTC).date():
        assert [p.spent_nanos for p in periods] == [expected] * 3


async def test_budget_status_of_a_fresh_user_and_the_org_layer(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    before = datetime.now(UTC)
    periods = await budget_status(ai_stub, uid)
    after = datetime.now(UTC)
    assert [p.period for p in periods] == [ai.BUDGET_PERIOD_DAILY, ai.BUDGET_PERIOD_WEEKLY, ai.BUDGET_PERIOD_MONTHLY]
    starts = [p.period_start.ToDatetime(tzinfo=UTC) for p in periods]
    assert starts in (utc_period_starts(before), utc_period_starts(after))
    assert starts[1].weekday() == 0 and starts[2].day == 1
    # The budgets are the subject's effective ones (seed 001's defaults unless a GLOBAL config sets them).
    budget = (await get_effective(ai_stub, uid)).configuration.cost_budget
    assert [(p.spent_nanos, p.budget_usd, list(p.thresholds_crossed), p.exceeded) for p in periods] == [
        (0, budget.daily_usd, [], False),
        (0, budget.weekly_usd, [], False),
        (0, budget.monthly_usd, [], False),
    ]
    # The org's budget applies to its users (org_id selects the org layer).
    daily = budget.daily_usd / 4
    await create_config(ai_stub, org_id=oid, values={"cost_budget.daily_usd": daily})
    expected = [daily, budget.weekly_usd, budget.monthly_usd]
    assert [p.budget_usd for p in await budget_status(ai_stub, uid, oid)] == expected
    assert [p.budget_usd for p in await budget_status(ai_stub, uid)] == [
        budget.daily_usd,
        budget.weekly_usd,
        budget.monthly_usd,
    ]
    # Reading itself, a user's org comes from its token.
    assert [p.budget_usd for p in await budget_status(ai_stub, uid, metadata=auth("user", uid, oid))] == expected


async def test_thresholds_are_crossed_once_each_and_reported_on_the_watch(ai_stub, db) -> None:
    uid, oid = unique("u"), unique("o")
    config = await create_config(ai_stub, user_id=uid, values=SMALL_BUDGET)
    call = ai_stub.WatchAIConfig(watch_request(uid, oid), metadata=ADMIN)
    assert (await call.read()).HasField("started")
    cost = (await estimate(ai_stub, HAIKU, 1000, 1000)).cost_nanos
    budget = int(0.01 * NANOS)
    # The record index (1-based) at which each threshold is first reached.
    crossing_at = {t: math.ceil(Fraction(str(t)) * budget / cost) for t in (0.5, 0.9)}
    records = crossing_at[0.9] + 1
    assert cost * records >= budget and crossing_at[0.5] < crossing_at[0.9]
    request_ids = [unique(f"req{i}-") for i in range(1, records + 1)]
    day_start = None
    for n, request_id in enumerate(request_ids, start=1):
        reply = await ai_stub.RecordUsage(usage(uid, request_id, org_id=oid), metadata=SERVICE)
        expected = [t for t, at in crossing_at.items() if at == n]
        assert [c.threshold for c in reply.crossed] == expected, n
        for crossed in reply.crossed:
            assert crossed.period == ai.BUDGET_PERIOD_DAILY
            assert (crossed.user_id, crossed.request_id, crossed.budget_usd) == (uid, request_id, 0.01)
            assert math.isclose(crossed.spent_usd, n * cost / NANOS, rel_tol=1e-12)
            day_start = crossed.period_start
        if n == records - 1:
            daily = (await budget_status(ai_stub, uid, oid))[0]
            assert (list(daily.thresholds_crossed), daily.exceeded) == ([0.5, 0.9], n * cost >= budget)
    assert day_start is not None

    await touch(ai_stub, config.id, 0.4)
    events = await budget_events_until_config_change(call, config.id)
    call.cancel()
    assert [(e.crossed.period, e.crossed.threshold) for e in events] == [
        (ai.BUDGET_PERIOD_DAILY, 0.5),
        (ai.BUDGET_PERIOD_DAILY, 0.9),
    ]
    assert [e.crossed.request_id for e in events] == [request_ids[crossing_at[t] - 1] for t in (0.5, 0.9)]
    assert all(e.cursor.token and e.crossed.user_id == uid and e.crossed.period_start == day_start for e in events)

    periods = await budget_status(ai_stub, uid, oid)
    daily, weekly, monthly = periods
    assert (daily.spent_nanos, daily.budget_usd, list(daily.thresholds_crossed), daily.exceeded) == (
        records * cost,
        0.01,
        [0.5, 0.9],
        True,
    )
    assert (weekly.budget_usd, list(weekly.thresholds_crossed), weekly.exceeded) == (1.0, [], False)
    assert (monthly.budget_usd, list(monthly.thresholds_crossed), monthly.exceeded) == (10.0, [], False)
    rows = await db.fetch(
        "SELECT key, scope_kind FROM changes WHERE kind = 'budget' AND scope_id = $1 ORDER BY id", uid
    )
    assert [(r["key"], r["scope_kind"]) for r in rows] == [("budget/daily", "USER")] * 2

    # Replaying the record that crossed 0.9 crosses nothing again.
    replay = await ai_stub.RecordUsage(usage(uid, request_ids[crossing_at[0.9] - 1], org_id=oid), metadata=SERVICE)
    assert (replay.recorded, list(replay.crossed)) == (False, [])
    assert await db.fetchval("SELECT count(*) FROM changes WHERE kind = 'budget' AND scope_id = $1", uid) == 2


async def test_concurrent_records_crossing_thresholds_report_each_once(ai_stub, db) -> None:
    uid, bystander, oid = unique("u"), unique("u"), unique("o")
    budget = {**SMALL_BUDGET, "cost_budget.weekly_usd": 0.1}
    config = await create_config(ai_stub, user_id=uid, values=budget)
    other_config = await create_config(ai_stub, user_id=bystander, values=budget)
    call = ai_stub.WatchAIConfig(watch_request(uid, oid), metadata=ADMIN)
    other = ai_stub.WatchAIConfig(watch_request(bystander, oid), metadata=ADMIN)
    assert (await call.read()).HasField("started") and (await other.read()).HasField("started")
    cost = (await estimate(ai_stub, HAIKU, 1000, 1000)).cost_nanos
    count = 55
    # Daily (one cent) passes 0.5 and 0.9; weekly (ten cents) passes 0.5 only.
    assert cost * count >= 0.05 * NANOS and cost * count < 0.09 * NANOS
    replies = await asyncio.gather(
        *(ai_stub.RecordUsage(usage(uid, unique(f"req{i}-"), org_id=oid), metadata=SERVICE) for i in range(count))
    )
    crossings = sorted((c.period, c.threshold) for r in replies for c in r.crossed)
    expected = [(ai.BUDGET_PERIOD_DAILY, 0.5), (ai.BUDGET_PERIOD_DAILY, 0.9), (ai.BUDGET_PERIOD_WEEKLY, 0.5)]
    assert crossings == expected

    await touch(ai_stub, config.id, 0.3)
    events = await budget_events_until_config_change(call, config.id)
    call.cancel()
    assert sorted((e.crossed.period, e.crossed.threshold) for e in events) == expected
    assert len({e.cursor.token for e in events}) == 3
    await touch(ai_stub, other_config.id, 0.3)
    assert await budget_events_until_config_change(other, other_config.id) == []
    other.cancel()

    assert await db.fetchval("SELECT count(*) FROM changes WHERE kind = 'budget' AND scope_id = $1", uid) == 3
    daily, weekly, _monthly = await budget_status(ai_stub, uid, oid)
    assert (daily.spent_nanos, list(daily.thresholds_crossed), daily.exceeded) == (count * cost, [0.5, 0.9], True)
    assert (list(weekly.thresholds_crossed), weekly.exceeded) == ([0.5], False)


async def test_spend_comes_from_the_ledger_when_the_redis_mirror_is_lost(ai_stub, db) -> None:
    uid = unique("u")
    first = await ai_stub.RecordUsage(usage(uid, unique("req-"), OPUS, 700, 300), metadata=SERVICE)
    assert [p.spent_nanos for p in await budget_status(ai_stub, uid)] == [first.cost_nanos] * 3
    if os.environ.get("REDIS_URL"):
        client = redis.from_url(os.environ["REDIS_URL"])
        try:
            mirrored = [key async for key in client.scan_iter(match=f"*{uid}*")]
            assert mirrored, "RecordUsage mirrors the totals in Redis"
            await client.delete(*mirrored)
        finally:
            await client.aclose()
    # The mirror is an optimisation only: without it the ledger answers, and later records still add up.
    assert [p.spent_nanos for p in await budget_status(ai_stub, uid)] == [first.cost_nanos] * 3
    second = await ai_stub.RecordUsage(usage(uid, unique("req-"), HAIKU, 10, 20), metadata=SERVICE)
    ledger = await db.fetchval("SELECT sum(cost_nanos) FROM ai_usage WHERE user_id = $1", uid)
    assert ledger == first.cost_nanos + second.cost_nanos
    assert [p.spent_nanos for p in await budget_status(ai_stub, uid)] == [ledger] * 3
