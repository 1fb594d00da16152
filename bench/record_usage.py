"""Benchmark: prefd's RecordUsage throughput against SetPreferences, over many users and on one hot user.

What it measures
    Closed-loop throughput (calls/s) of ``/prefd.v1.AIConfigService/RecordUsage`` with --concurrency
    calls in flight at once (default 64, grpc.aio tasks spread over --channels connections in each
    of --procs client processes), against a baseline measured in the same run on the same prefd:
    ``SetPreferences`` writing one key (display.items_per_page, USER scope, org bench-org) for the
    same users with the same client and the same concurrency, an ordinary prefd write. Each
    RecordUsage call is a new generation (unique request_id, model claude-3-haiku-20240307,
    200-2,000 input and 50-800 output tokens, service token); each SetPreferences call changes
    the user's value (admin token). Two shapes:

    * spread: calls go round-robin over --users users (default 1,000), so the 64 calls in flight
      are for 64 different users;
    * hot: every call is for one user, so the per-user rows (RecordUsage's spend totals,
      SetPreferences' USER scope) serialise the calls.

    Every run loads for --warmup seconds (default 1, not reported) and then --duration seconds
    (default 8) without a pause in between; calls started in the measured window are awaited;
    calls/s = calls that succeeded in the window / (time until the last of them returned). Each
    run also reports latency percentiles and the CPU seconds prefd, PostgreSQL (all processes of
    the server, best effort) and the client used per second of the window (a client near 1.0 is
    itself the bottleneck), and prefd's CPU milliseconds per call.

Rounds
    --rounds rounds (default 5, at least 3); each round runs the spread shape, then the hot one,
    each as RecordUsage and SetPreferences back to back, RecordUsage first in odd rounds and
    SetPreferences first in even rounds. One prefd serves the whole run. The report gives every
    run, the medians per shape and call, per shape the ratio of median calls/s RecordUsage /
    SetPreferences, and each round's own ratio with their median (the two runs of a round share
    the machine's background load, so on a noisy machine the paired ratios are steadier).

Correctness (checked at the end, reported under "correctness"; "all_correct" sums it up)
    * every RecordUsage response has recorded=true and the cost the catalog prices give
      (half-up to the nano-dollar; the prices come from ListModels and are checked against
      EstimateCost first);
    * calls that failed are sent again with the same request_id (the result of a timed-out call
      is unknown; RecordUsage is idempotent), so that every generation sent is acknowledged;
    * then the ledger, ``SELECT count(*), sum(cost_nanos) FROM ai_usage``, must equal the number
      and the summed cost of the acknowledged generations (warm-up calls included), and
      ``ai_usage_totals`` must hold the same sum per user in each period;
    * a sample of acknowledged calls sent again must answer recorded=false with the same cost and
      record_time and add nothing;
    * budget alerts: an ORG config gives bench-org small budgets (--budget-usd a day, twice that a
      week, four times a month, thresholds 0.5/0.75/0.9), so the hot user crosses thresholds while
      64 calls race: each (user, period, threshold) reached must be reported by exactly one
      RecordUsage response and one ``changes`` row of kind 'budget', and the hot user's
      GetBudgetStatus must show the ledger's spend (these two are skipped when the run spans a
      UTC period boundary).

Setup and output as in bench/write_throughput.py: a fresh database (on DATABASE_URL's server, else
an embedded PostgreSQL started by this script) dropped at the end, prefd as a child process without
Redis (--redis-url to give it one) pinned to the first CPU and the clients to the others (--no-pin
to disable), PostgreSQL unpinned; tokens minted with the JWT secret prefd is started with; one JSON
document on stdout, progress on stderr.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/record_usage.py
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.procstats import PostgresCpu, cpu_seconds
from harness.progress import log
from harness.stats import median_or_none, percentiles_ms, ratio

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, common_pb2, preferences_pb2, preferences_pb2_grpc

METHOD = "/prefd.v1.AIConfigService/RecordUsage"
BASELINE_METHOD = "/prefd.v1.PreferencesService/SetPreferences"
ORG = "bench-org"
MODEL = "claude-3-haiku-20240307"
KEY = "display.items_per_page"  # INT, 1..200, in no cross-field rule
HOT_USER = "bench-hot"
THRESHOLDS = (0.5, 0.75, 0.9)
INPUT_TOKENS = (200, 2000)
OUTPUT_TOKENS = (50, 800)
CALL_TIMEOUT_S = 30.0
CONNECT_S = 1.0  # time the client processes get to connect before the warm-up begins
IDEMPOTENCY_SAMPLE = 10  # acknowledged calls per client process and run that are replayed at the end
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
OPS = ("record_usage", "set_preferences")
SHAPES = ("spread", "hot")
PERIODS = {  # BudgetPeriod -> ai_usage_totals.period and the budget multiple of --budget-usd
    ai_config_pb2.BUDGET_PERIOD_DAILY: ("daily", 1),
    ai_config_pb2.BUDGET_PERIOD_WEEKLY: ("weekly", 2),
    ai_config_pb2.BUDGET_PERIOD_MONTHLY: ("monthly", 4),
}


def cost_nanos(tokens: int, nanos_per_1k: int) -> int:
    """tokens * price / 1000, rounded half up to the nano-dollar (as the spec prices a call)."""
    return (tokens * nanos_per_1k + 500) // 1000


# --------------------------------------------------------------------------- one load window


@dataclass(frozen=True)
class WindowSpec:
    """What one client process does in one run (picklable: it crosses into worker processes)."""

    port: int
    op: str  # "record_usage" or "set_preferences"
    users: tuple[str, ...]  # round-robin over these, starting at user_offset
    user_offset: int
    token: str
    channels: int
    concurrency: int
    start_at: float  # time.monotonic() when the measured window opens (CLOCK_MONOTONIC is system-wide)
    end_at: float  # ... and when no further call is started
    id_prefix: str  # request_id prefix, unique per process and run
    seed: int
    input_nanos_per_1k: int
    output_nanos_per_1k: int


@dataclass
class WindowResult:
    """What one client process saw in one run."""

    measured_ok: int = 0  # successful calls started in the measured window
    last_return: float = 0.0  # monotonic time the last of them returned
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # by status code, warm-up included
    client_cpu_s: float = 0.0  # this process, from the window's start to its end
    # RecordUsage, warm-up included:
    acked: int = 0  # recorded=true responses
    acked_cost_nanos: int = 0  # their summed cost_nanos
    not_recorded: int = 0  # recorded=false for a new request_id (wrong)
    cost_mismatches: int = 0  # cost_nanos differing from the catalog price
    crossed: list[tuple[str, int, float, int]] = field(default_factory=list)  # (user, period, threshold, start)
    failed: list[bytes] = field(default_factory=list)  # requests that failed: replayed at the end
    sample: list[tuple[bytes, int, int]] = field(default_factory=list)  # (request, cost, record_time ns)
    # SetPreferences:
    changes: int = 0  # change entries in the responses


def worker_window(spec: WindowSpec) -> WindowResult:
    """A client process's run (ProcessPoolExecutor entry point)."""
    return asyncio.run(run_window(spec))


async def run_window(spec: WindowSpec) -> WindowResult:
    """Keep spec.concurrency calls in flight until spec.end_at; measure those started after spec.start_at."""
    result = WindowResult()
    rng = random.Random(spec.seed)
    metadata = auth_metadata(spec.token)
    counter = iter(range(1 << 62))
    channels = [grpc.aio.insecure_channel(f"{HOST}:{spec.port}", options=CHANNEL_OPTIONS) for _ in range(spec.channels)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        ai_stubs = [ai_config_pb2_grpc.AIConfigServiceStub(channel) for channel in channels]
        pref_stubs = [preferences_pb2_grpc.PreferencesServiceStub(channel) for channel in channels]

        async def record_usage(worker: int, user: str, seq: int) -> None:
            request = ai_config_pb2.RecordUsageRequest(
                subject=common_pb2.Subject(user_id=user, org_id=ORG),
                model=MODEL,
                input_tokens=rng.randint(*INPUT_TOKENS),
                output_tokens=rng.randint(*OUTPUT_TOKENS),
                request_id=f"{spec.id_prefix}-{seq}",
            )
            try:
                response = await ai_stubs[worker % len(ai_stubs)].RecordUsage(
                    request, metadata=metadata, timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                result.failed.append(request.SerializeToString())
                raise
            expected = cost_nanos(request.input_tokens, spec.input_nanos_per_1k) + cost_nanos(
                request.output_tokens, spec.output_nanos_per_1k
            )
            if response.cost_nanos != expected:
                result.cost_mismatches += 1
            if not response.recorded:
                result.not_recorded += 1
                return
            result.acked += 1
            result.acked_cost_nanos += response.cost_nanos
            result.crossed.extend(
                (c.user_id, c.period, c.threshold, c.period_start.ToNanoseconds()) for c in response.crossed
            )
            if len(result.sample) < IDEMPOTENCY_SAMPLE:
                result.sample.append(
                    (request.SerializeToString(), response.cost_nanos, response.record_time.ToNanoseconds())
                )

        async def set_preferences(worker: int, user: str, seq: int) -> None:
            # Successive writes to one user get successive values, so each changes the stored value.
            value = (seq // len(spec.users)) % 200 + 1
            request = preferences_pb2.SetPreferencesRequest(
                scope=common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=user),
                writes=[preferences_pb2.PreferenceWrite(key=KEY, value=common_pb2.TypedValue(int_value=value))],
                reason="record_usage benchmark baseline",
                org_id=ORG,
            )
            response = await pref_stubs[worker % len(pref_stubs)].SetPreferences(
                request, metadata=metadata, timeout=CALL_TIMEOUT_S
            )
            result.changes += len(response.changes)

        call = record_usage if spec.op == "record_usage" else set_preferences

        async def loop(worker: int) -> None:
            while (started := time.monotonic()) < spec.end_at:
                seq = next(counter)
                user = spec.users[(spec.user_offset + seq) % len(spec.users)]
                started_ns = time.monotonic_ns()
                try:
                    await call(worker, user, seq)
                except grpc.aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                if started >= spec.start_at:
                    result.latencies_ns.append(time.monotonic_ns() - started_ns)
                    result.measured_ok += 1
                    result.last_return = max(result.last_return, time.monotonic())

        async def client_cpu() -> float:
            await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
            return time.process_time()

        cpu_task = asyncio.create_task(client_cpu())
        await asyncio.gather(*(loop(i) for i in range(spec.concurrency)))
        result.client_cpu_s = time.process_time() - await cpu_task
    finally:
        for channel in channels:
            await channel.close()
    return result


# --------------------------------------------------------------------------- one run


@dataclass
class Totals:
    """What the whole run sent and had acknowledged, for the checks at the end."""

    acked: int = 0
    acked_cost_nanos: int = 0
    not_recorded: int = 0
    cost_mismatches: int = 0
    crossed: list[tuple[str, int, float, int]] = field(default_factory=list)
    failed: list[bytes] = field(default_factory=list)
    sample: list[tuple[bytes, int, int]] = field(default_factory=list)

    def add(self, result: WindowResult) -> None:
        self.acked += result.acked
        self.acked_cost_nanos += result.acked_cost_nanos
        self.not_recorded += result.not_recorded
        self.cost_mismatches += result.cost_mismatches
        self.crossed.extend(result.crossed)
        self.failed.extend(result.failed)
        self.sample.extend(result.sample)


@dataclass
class Bench:
    """What every run needs: the server, the clients, the tokens and the prices."""

    args: argparse.Namespace
    port: int
    prefd_pid: int
    tokens: Tokens
    pool: concurrent.futures.ProcessPoolExecutor | None
    postgres: PostgresCpu
    prices: tuple[int, int]  # input, output nano-USD per 1,000 tokens
    spread_users: tuple[str, ...]
    run_id: str
    totals: Totals = field(default_factory=Totals)


async def measure(bench: Bench, op: str, shape: str, round_no: int) -> dict[str, Any]:
    """One run: `op` calls in `shape` for warm-up + duration; its record."""
    args = bench.args
    users = bench.spread_users if shape == "spread" else (HOT_USER,)
    token = bench.tokens.service if op == "record_usage" else bench.tokens.admin
    load_before = loadavg_1m()
    start_at = time.monotonic() + CONNECT_S + args.warmup
    end_at = start_at + args.duration
    per_proc = [args.concurrency // args.procs + (i < args.concurrency % args.procs) for i in range(args.procs)]
    specs = [
        WindowSpec(
            port=bench.port,
            op=op,
            users=users,
            user_offset=i * len(users) // args.procs,
            token=token,
            channels=args.channels,
            concurrency=n,
            start_at=start_at,
            end_at=end_at,
            id_prefix=f"{bench.run_id}-r{round_no}-{shape}-p{i}",
            seed=random.Random(f"{args.seed}-{round_no}-{shape}-{op}-{i}").getrandbits(32),
            input_nanos_per_1k=bench.prices[0],
            output_nanos_per_1k=bench.prices[1],
        )
        for i, n in enumerate(per_proc)
        if n > 0
    ]
    pending: list[asyncio.Future[WindowResult]]
    if bench.pool is None:
        pending = [asyncio.ensure_future(run_window(spec)) for spec in specs]
    else:
        loop = asyncio.get_running_loop()
        pending = [loop.run_in_executor(bench.pool, worker_window, spec) for spec in specs]
    try:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        prefd_cpu_before = cpu_seconds(bench.prefd_pid)
        pg_cpu_before = bench.postgres.seconds()
        results: list[WindowResult] = await asyncio.gather(*pending)
    except BaseException:
        for future in pending:
            future.cancel()
        raise
    cpu_window_s = time.monotonic() - start_at
    prefd_cpu = cpu_seconds(bench.prefd_pid) - prefd_cpu_before
    pg_cpu_after = bench.postgres.seconds()
    pg_cpu = None if pg_cpu_before is None or pg_cpu_after is None else pg_cpu_after - pg_cpu_before

    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
        bench.totals.add(result)
    ok = sum(r.measured_ok for r in results)
    if ok == 0:
        raise RuntimeError(f"{op} {shape}: no call succeeded in the window ({dict(errors)}); see prefd.stderr")
    elapsed = max(r.last_return for r in results) - start_at
    per_s = ok / elapsed
    latencies = [ns for r in results for ns in r.latencies_ns]
    log(f"round {round_no} {shape} {op}: {per_s:.0f} calls/s, {ok} ok, errors {dict(errors) or 0}")
    record: dict[str, Any] = {
        "round": round_no,
        "shape": shape,
        "op": op,
        "calls_per_s": round(per_s, 1),
        "successful_calls": ok,
        "failed_calls": dict(errors),
        "window_s": round(elapsed, 3),
        "latency_ms": percentiles_ms(latencies),
        "prefd_cpu_s_per_s": round(prefd_cpu / cpu_window_s, 3),
        "prefd_cpu_ms_per_call": round(prefd_cpu * 1000 / ok, 3),
        "postgres_cpu_s_per_s": None if pg_cpu is None else round(pg_cpu / cpu_window_s, 3),
        "client_cpu_s_per_s": round(sum(r.client_cpu_s for r in results) / cpu_window_s, 3),
        "loadavg_1m_before": load_before,
    }
    if op == "set_preferences":
        record["changes"] = sum(r.changes for r in results)
    return record


# --------------------------------------------------------------------------- setup and checks


async def catalog_prices(stub: ai_config_pb2_grpc.AIConfigServiceAsyncStub, token: str) -> tuple[int, int]:
    """MODEL's prices in nano-USD per 1,000 tokens, from ListModels, checked against EstimateCost."""
    models = await stub.ListModels(ai_config_pb2.ListModelsRequest(), metadata=auth_metadata(token), timeout=30)
    found = [m for m in models.models if m.model == MODEL]
    if not found:
        raise RuntimeError(f"{MODEL} is not in the catalog: {[m.model for m in models.models]}")
    prices = (round(found[0].input_usd_per_1k * 1e9), round(found[0].output_usd_per_1k * 1e9))
    for input_tokens, output_tokens in ((1000, 1000), (1234, 567), (1, 1)):
        request = ai_config_pb2.EstimateCostRequest(model=MODEL, input_tokens=input_tokens, output_tokens=output_tokens)
        estimate = await stub.EstimateCost(request, metadata=auth_metadata(token), timeout=30)
        expected = cost_nanos(input_tokens, prices[0]) + cost_nanos(output_tokens, prices[1])
        if estimate.cost_nanos != expected:
            raise RuntimeError(
                f"EstimateCost({MODEL}, {input_tokens}, {output_tokens}) = {estimate.cost_nanos} nanos; "
                f"the ListModels prices {prices} give {expected}"
            )
    return prices


async def create_org_budget(stub: ai_config_pb2_grpc.AIConfigServiceAsyncStub, token: str, daily_usd: float) -> str:
    """An ORG config for bench-org with small budgets, so the hot user crosses thresholds; its id."""
    config = ai_config_pb2.AIConfig(
        name="bench-budget",
        org_id=ORG,
        active=True,
        configuration=ai_config_pb2.AIConfiguration(
            cost_budget=ai_config_pb2.CostBudget(
                daily_usd=daily_usd * PERIODS[ai_config_pb2.BUDGET_PERIOD_DAILY][1],
                weekly_usd=daily_usd * PERIODS[ai_config_pb2.BUDGET_PERIOD_WEEKLY][1],
                monthly_usd=daily_usd * PERIODS[ai_config_pb2.BUDGET_PERIOD_MONTHLY][1],
                alert_thresholds=ai_config_pb2.AlertThresholds(values=THRESHOLDS),
            )
        ),
    )
    request = ai_config_pb2.CreateAIConfigRequest(config=config, reason="record_usage benchmark setup")
    response = await stub.CreateAIConfig(request, metadata=auth_metadata(token), timeout=30)
    return str(response.config.id)


async def replay_failed(bench: Bench, stub: ai_config_pb2_grpc.AIConfigServiceAsyncStub) -> dict[str, Any]:
    """Send every failed RecordUsage again (same request_id); count what is acknowledged now."""
    totals = bench.totals
    codes: Counter[str] = Counter()
    recorded_now = already_recorded = still_failing = 0
    for raw in totals.failed:
        request = ai_config_pb2.RecordUsageRequest.FromString(raw)
        for attempt in range(3):
            try:
                response = await stub.RecordUsage(
                    request, metadata=auth_metadata(bench.tokens.service), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                if attempt == 2:
                    codes[exc.code().name] += 1
                    still_failing += 1
                continue
            # Either way the generation is in the ledger now, once.
            totals.acked += 1
            totals.acked_cost_nanos += response.cost_nanos
            if response.recorded:
                recorded_now += 1
                totals.crossed.extend(
                    (c.user_id, c.period, c.threshold, c.period_start.ToNanoseconds()) for c in response.crossed
                )
            else:
                already_recorded += 1
            break
    return {
        "failed_calls": len(totals.failed),
        "replayed_and_recorded_now": recorded_now,
        "replayed_already_recorded": already_recorded,
        "still_failing": still_failing,
        "still_failing_codes": dict(codes),
    }


async def check_idempotency(bench: Bench, stub: ai_config_pb2_grpc.AIConfigServiceAsyncStub) -> dict[str, Any]:
    """Acknowledged calls sent again: recorded=false, the first cost and record_time."""
    wrong: list[str] = []
    for raw, cost, record_time_ns in bench.totals.sample:
        request = ai_config_pb2.RecordUsageRequest.FromString(raw)
        response = await stub.RecordUsage(request, metadata=auth_metadata(bench.tokens.service), timeout=30)
        got = (response.recorded, response.cost_nanos, response.record_time.ToNanoseconds(), len(response.crossed))
        if got != (False, cost, record_time_ns, 0):
            wrong.append(
                f"{request.request_id}: recorded={got[0]} cost={got[1]} record_time={got[2]} crossed={got[3]}; "
                f"expected recorded=False cost={cost} record_time={record_time_ns} crossed=0"
            )
    return {"replayed": len(bench.totals.sample), "wrong": len(wrong), "examples": wrong[:5], "ok": not wrong}


def same_periods(first: dt.datetime, last: dt.datetime) -> bool:
    """Whether two UTC instants share their day (hence ISO week and month)."""
    return first.astimezone(dt.UTC).date() == last.astimezone(dt.UTC).date()


async def check_ledger(bench: Bench, conn: asyncpg.Connection) -> dict[str, Any]:
    """The ledger and the per-period totals against what was acknowledged."""
    totals = bench.totals
    count, cost_sum = await conn.fetchrow("SELECT count(*), coalesce(sum(cost_nanos), 0) FROM ai_usage")
    ledger = {
        "rows": count,
        "sum_cost_nanos": int(cost_sum),
        "acknowledged_calls": totals.acked,
        "acknowledged_cost_nanos": totals.acked_cost_nanos,
        "matches": count == totals.acked and int(cost_sum) == totals.acked_cost_nanos,
    }
    period_mismatches: dict[str, Any] = {}
    try:
        for period, _ in PERIODS.values():
            mismatched = await conn.fetchval(
                """
                WITH l AS (SELECT user_id, sum(cost_nanos) AS s FROM ai_usage GROUP BY user_id),
                     t AS (SELECT user_id, sum(cost_nanos) AS s FROM ai_usage_totals WHERE period = $1
                           GROUP BY user_id)
                SELECT count(*) FROM l FULL JOIN t USING (user_id) WHERE l.s IS DISTINCT FROM t.s
                """,
                period,
            )
            period_mismatches[period] = mismatched
        usage_totals = {
            "users_whose_total_differs_from_ledger": period_mismatches,
            "matches": not any(period_mismatches.values()),
        }
    except asyncpg.PostgresError as exc:
        usage_totals = {"matches": None, "not_checked": f"{type(exc).__name__}: {exc}"}
    return {"ledger": ledger, "usage_totals": usage_totals}


async def check_budgets(
    bench: Bench, conn: asyncpg.Connection, stub: ai_config_pb2_grpc.AIConfigServiceAsyncStub
) -> dict[str, Any]:
    """Threshold crossings: reported once each, one change row each, as the ledger implies; hot user's status."""
    first, last = await conn.fetchrow("SELECT min(recorded_at), max(recorded_at) FROM ai_usage")
    if first is None or not same_periods(first, last):
        return {"ok": None, "not_checked": "the run spans a UTC day boundary (or recorded nothing)"}
    budget_nanos = {p: round(bench.args.budget_usd * multiple * 1e9) for p, (_, multiple) in PERIODS.items()}
    spent = {
        row["user_id"]: int(row["s"])
        for row in await conn.fetch("SELECT user_id, sum(cost_nanos) AS s FROM ai_usage GROUP BY user_id")
    }
    expected = {
        (user, period, threshold)
        for user, nanos in spent.items()
        for period, budget in budget_nanos.items()
        for threshold in THRESHOLDS
        if nanos >= Decimal(repr(threshold)) * budget
    }
    reported = Counter((user, period, threshold) for user, period, threshold, _ in bench.totals.crossed)
    duplicates = sum(n - 1 for n in reported.values() if n > 1)
    change_rows = await conn.fetchval("SELECT count(*) FROM changes WHERE kind = 'budget'")

    status = await stub.GetBudgetStatus(
        ai_config_pb2.GetBudgetStatusRequest(subject=common_pb2.Subject(user_id=HOT_USER, org_id=ORG)),
        metadata=auth_metadata(bench.tokens.service),
        timeout=30,
    )
    hot_spent = spent.get(HOT_USER, 0)
    status_problems = []
    for entry in status.periods:
        budget = budget_nanos.get(entry.period)
        if budget is None:
            status_problems.append(f"unexpected period {entry.period}")
            continue
        want_crossed = [t for t in THRESHOLDS if hot_spent >= Decimal(repr(t)) * budget]
        got = (entry.spent_nanos, list(entry.thresholds_crossed), entry.exceeded)
        want = (hot_spent, want_crossed, hot_spent >= budget)
        if got != want:
            status_problems.append(f"{PERIODS[entry.period][0]}: (spent, crossed, exceeded) = {got}, expected {want}")
    if [p.period for p in status.periods] != list(PERIODS):
        status_problems.append(f"periods {[p.period for p in status.periods]}, expected daily, weekly, monthly")

    crossings = {
        "expected_from_ledger": len(expected),
        "reported_by_record_usage": sum(reported.values()),
        "duplicates_reported": duplicates,
        "missing": len(expected - set(reported)),
        "unexpected": len(set(reported) - expected),
        "change_rows_kind_budget": change_rows,
        "hot_user_crossed": sorted(f"{PERIODS[p][0]}@{t:g}" for u, p, t in expected if u == HOT_USER),
    }
    crossings_ok = (
        duplicates == 0 and set(reported) == expected and change_rows == len(expected) == sum(reported.values())
    )
    return {
        "budget_usd": {PERIODS[p][0]: round(n / 1e9, 3) for p, n in budget_nanos.items()},
        "crossings": crossings,
        "hot_user_status": {"spent_nanos": hot_spent, "problems": status_problems},
        "ok": crossings_ok and not status_problems,
    }


# --------------------------------------------------------------------------- main flow


@contextlib.contextmanager
def client_pool(procs: int) -> Any:
    """`procs` spawned client processes (None for one: the load then runs in this process)."""
    if procs == 1:
        yield None
        return
    # spawn, not fork: a forked child would inherit this process's gRPC state.
    pool = concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        # Start them (and let them import grpc and prefd) before anything is measured.
        list(pool.map(time.sleep, [0.2] * procs))
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Set up, run the alternating rounds, check, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    runs: list[dict[str, Any]] = []
    extra_env = {"REDIS_URL": args.redis_url} if args.redis_url else {}
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned
        prefd = await start_prefd(db, tokens, work_dir / "prefd", pinning.server, extra_env)
        exit_code: int | None = None
        try:
            assert prefd.proc is not None
            conn = await asyncpg.connect(db.dsn)
            channel = grpc.aio.insecure_channel(f"{HOST}:{prefd.port}")
            try:
                stub = ai_config_pb2_grpc.AIConfigServiceStub(channel)
                prices = await catalog_prices(stub, tokens.service)
                budget_config = await create_org_budget(stub, tokens.admin, args.budget_usd)
                log(f"{MODEL}: {prices[0]}/{prices[1]} nano-USD per 1k tokens; ORG budget config {budget_config}")
                with client_pool(args.procs) as pool:
                    bench = Bench(
                        args=args,
                        port=prefd.port,
                        prefd_pid=prefd.proc.pid,
                        tokens=tokens,
                        pool=pool,
                        postgres=await PostgresCpu.find(conn),
                        prices=prices,
                        spread_users=tuple(f"bench-u{i:05d}" for i in range(args.users)),
                        run_id=f"ru{random.Random(args.seed).getrandbits(32):08x}",
                    )
                    for round_no in range(1, args.rounds + 1):
                        for shape in SHAPES:
                            order = OPS if round_no % 2 else tuple(reversed(OPS))
                            for op in order:
                                log(f"round {round_no}/{args.rounds} {shape} {op}: {args.concurrency} in flight")
                                runs.append(await measure(bench, op, shape, round_no))
                log("checking the ledger")
                replays = await replay_failed(bench, stub)
                idempotency = await check_idempotency(bench, stub)
                ledger = await check_ledger(bench, conn)
                budgets = await check_budgets(bench, conn, stub)
            finally:
                await channel.close()
                await conn.close()
        finally:
            exit_code = prefd.stop()

    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, Any]] = {}
    for shape in SHAPES:
        medians[shape] = {}
        for op in OPS:
            mine = [r for r in runs if r["shape"] == shape and r["op"] == op]
            medians[shape][op] = {
                "calls_per_s": median_or_none([r["calls_per_s"] for r in mine]),
                "latency_p50_ms": median_or_none([r["latency_ms"]["p50"] for r in mine]),
                "latency_p99_ms": median_or_none([r["latency_ms"]["p99"] for r in mine]),
                "prefd_cpu_s_per_s": median_or_none([r["prefd_cpu_s_per_s"] for r in mine]),
                "prefd_cpu_ms_per_call": median_or_none([r["prefd_cpu_ms_per_call"] for r in mine]),
                "postgres_cpu_s_per_s": median_or_none([r["postgres_cpu_s_per_s"] for r in mine]),
                "client_cpu_s_per_s": median_or_none([r["client_cpu_s_per_s"] for r in mine]),
            }

        def rate(round_no: int, op: str, shape: str = shape) -> float:
            key = (round_no, shape, op)
            return float(next(r["calls_per_s"] for r in runs if (r["round"], r["shape"], r["op"]) == key))

        paired = [ratio(rate(n, "record_usage"), rate(n, "set_preferences")) for n in range(1, args.rounds + 1)]
        ratios[shape] = {
            "calls_per_s_record_usage_over_set_preferences": ratio(
                medians[shape]["record_usage"]["calls_per_s"], medians[shape]["set_preferences"]["calls_per_s"]
            ),
            "paired_round_ratios": paired,
            "median_paired_ratio": median_or_none(paired),
            "prefd_cpu_per_call_record_usage_over_set_preferences": ratio(
                medians[shape]["record_usage"]["prefd_cpu_ms_per_call"],
                medians[shape]["set_preferences"]["prefd_cpu_ms_per_call"],
            ),
        }
    totals = bench.totals
    correctness = {
        "responses": {
            "recorded_false_for_a_new_request_id": totals.not_recorded,
            "cost_differs_from_catalog_price": totals.cost_mismatches,
            "ok": totals.not_recorded == 0 and totals.cost_mismatches == 0,
        },
        "failed_calls_replayed": replays,
        "idempotent_replays": idempotency,
        **ledger,
        "budgets": budgets,
    }
    all_correct = bool(
        correctness["responses"]["ok"]
        and replays["still_failing"] == 0
        and idempotency["ok"]
        and ledger["ledger"]["matches"]
        and ledger["usage_totals"]["matches"] is not False
        and budgets["ok"] is not False
    )
    if not all_correct:
        log("CORRECTNESS PROBLEMS: see the report's correctness section")
    return {
        "benchmark": "RecordUsage throughput vs SetPreferences, spread over many users and on one hot user",
        "method": METHOD,
        "baseline": f"set_preferences: {BASELINE_METHOD}, one key ({KEY}) at USER scope for the same users, "
        "same client, same concurrency, same prefd, measured in the same rounds",
        "load_generator_note": "the clients (grpc.aio, --procs processes) run on the same machine as prefd and "
        "PostgreSQL; by default they are pinned to the CPUs prefd is not on and share them with PostgreSQL. "
        "client_cpu_s_per_s near 1.0 per process means the client, not prefd, limited the rate.",
        "machine": machine,
        "parameters": {
            "concurrency": args.concurrency,
            "procs": args.procs,
            "channels_per_proc": args.channels,
            "users_spread": args.users,
            "hot_user": HOT_USER,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "order": "per round: spread then hot; record_usage first in odd rounds, set_preferences first in even",
            "record_usage": f"model {MODEL}, input {INPUT_TOKENS[0]}-{INPUT_TOKENS[1]} and output "
            f"{OUTPUT_TOKENS[0]}-{OUTPUT_TOKENS[1]} tokens (uniform), a new request_id per call, org {ORG}, "
            "service token",
            "set_preferences": f"{KEY} at USER scope (a new value each call), org_id {ORG}, admin token",
            "org_budget_usd": {"daily": args.budget_usd, "weekly": args.budget_usd * 2, "monthly": args.budget_usd * 4},
            "seed": args.seed,
            "prefd_settings": "defaults (pool 2..10 connections), "
            + (f"REDIS_URL {args.redis_url}" if args.redis_url else "no Redis"),
        },
        "pinning": pinning.describe(),
        "database": db.describe(),
        "runs": runs,
        "median": medians,
        "ratios": ratios,
        "correctness": correctness,
        "all_correct": all_correct,
        "prefd_exit_code": exit_code,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(description="prefd RecordUsage throughput against SetPreferences.")
    parser.add_argument("--concurrency", type=positive_int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--procs", type=positive_int, default=1, help="client processes sharing them (default 1)")
    parser.add_argument("--channels", type=positive_int, default=4, help="connections per client process (default 4)")
    parser.add_argument("--users", type=positive_int, default=1000, help="users of the spread shape (default 1000)")
    parser.add_argument("--duration", type=positive_float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unreported seconds of load first (default 1)")
    parser.add_argument("--rounds", type=rounds_arg, default=5, help="alternating rounds, at least 3 (default 5)")
    parser.add_argument(
        "--budget-usd", type=positive_float, default=5.0, help="bench-org's daily budget; x2 weekly, x4 monthly"
    )
    parser.add_argument("--redis-url", help="give prefd this REDIS_URL (default: no Redis)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for token counts (default 1)")
    add_pin_option(parser, "pin prefd to the first CPU and the clients to the rest (default on; needs >= 2 CPUs)")
    args = parser.parse_args(argv)
    if args.procs > args.concurrency:
        parser.error("--procs cannot exceed --concurrency")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-usage-")


if __name__ == "__main__":
    raise SystemExit(main())
