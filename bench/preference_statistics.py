"""Benchmark: statistics reads at 1,000,000 users against the seed's GROUP BY, and SetPreferences
throughput with the statistics consumer on vs off.

How the data gets there (said in the report too)
    A fresh database; prefd is started once to migrate it and install the shipped definitions. Then
    --users users (default 1,000,000) get overrides of a few keys, generated inside PostgreSQL
    (INSERT .. SELECT over generate_series, --load-chunk users per transaction): every user
    display.theme (dark 50%, light 30%, system 20%), 60% locale.language (5 values), 30%
    display.items_per_page (4 values) and 5% the sensitive notifications.sms.phone_number (a distinct
    number each); user n is in org bo<n mod 1000>. Each stored value gets the change row the writer would
    have written (version 1, same transaction, naming the user's org), so the change feed explains every
    value. The statistics are then built from that feed
    by the one rebuild command, `prefd rebuild-statistics` (timed), not by a GROUP BY.

Reads
    prefd (pinned to the first CPU, consumer on) serves GetKeyStatistics (display.theme, every scope
    kind, top 10 values plus other) serially over gRPC with a service token: --reads calls after
    --read-warmup unreported ones; p50 and p99. The baseline is the seed's get_preference_statistics
    query (COUNT(DISTINCT user) and the value distribution by GROUP BY over the stored values, on the
    index of live values by key) run --baseline-runs times on one asyncpg connection straight to
    PostgreSQL, in the same run on the same data: no gRPC, no token, no JSON in between, so the ratio
    favours the baseline. Targets: baseline p50 / prefd p50 >= 100, prefd p50 <= 10 ms. The figures
    prefd returns are checked against the baseline's (`statistics_equal_group_by`).

Throughput
    As bench/write_throughput.py (closed loop, --clients writers over --channels connections, a new user
    per call, one key per write) with the statistics consumer on and off, alternating over --rounds rounds
    on the loaded database. "off" is this process holding the runner's advisory lock, so the prefd under
    test stands by exactly as a second replica would; nothing else differs. Before an "on" window the
    consumer first catches up with the previous "off" window's writes (not measured). After each "on"
    window the time until the statistics reflect every write is reported (`catch_up_s`), and prefd's CPU
    per write (up to that point, so the consumer's work on the window is in it): less sensitive than
    writes/s to other load on the machine. Target: median writes/s on / off >= 0.90.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/preference_statistics.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, child_env, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import BenchDatabase, fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.procstats import cpu_seconds
from harness.progress import log
from harness.stats import median_or_none, percentiles_ms, ratio
from write_throughput import CHANNEL_OPTIONS, LoadResult, count_changes, run_load

from prefd.v1 import preferences_pb2_grpc, statistics_pb2, statistics_pb2_grpc
from prefd_server.statistics.store import RUNNER_LOCK_KEY

KEY = "display.theme"
TARGET_SPEEDUP = 100.0
TARGET_P50_MS = 10.0
TARGET_RATIO = 0.90
CALL_TIMEOUT_S = 30.0

LOAD = """WITH gen AS (
    SELECT 'bu' || n AS user_id, 'bo' || (n % 1000) AS org_id, v.key, v.value
    FROM generate_series($1::bigint, $2::bigint) AS n
    CROSS JOIN LATERAL (VALUES
        ('display.theme', to_jsonb(CASE WHEN n % 10 < 5 THEN 'dark' WHEN n % 10 < 8 THEN 'light' ELSE 'system' END)),
        ('locale.language', CASE WHEN n % 10 < 6 THEN to_jsonb((ARRAY['en', 'fr', 'de', 'ja', 'es'])[1 + n % 5]) END),
        ('display.items_per_page',
         CASE WHEN n % 10 IN (3, 6, 9) THEN to_jsonb((ARRAY[10, 25, 50, 100])[1 + n % 4]) END),
        ('notifications.sms.phone_number', CASE WHEN n % 20 = 7 THEN to_jsonb('+1555' || lpad(n::text, 7, '0')) END)
    ) AS v(key, value)
    WHERE v.value IS NOT NULL),
values_written AS (
    INSERT INTO preference_values (scope_kind, scope_id, key, value, version, updated_by)
    SELECT 'USER', user_id, key, value, 1, 'bench-admin' FROM gen)
INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version, actor, reason, org_id)
SELECT 'preference', 'USER', user_id, key, NULL, value, 1, 'bench-admin', 'statistics bench bulk load', org_id
FROM gen"""

# The seed's get_preference_statistics (seed 000), over prefd's table of stored values.
SEED_GROUP_BY = """WITH stats AS (
    SELECT COUNT(DISTINCT scope_id) AS total_users, COUNT(*) AS total_changes, value AS preference_value,
           COUNT(*) AS value_count
    FROM preference_values WHERE key = $1 AND value IS NOT NULL
    GROUP BY value)
SELECT MAX(total_users) AS total_users, SUM(value_count) AS total_values,
       ARRAY_AGG(json_build_object('value', preference_value, 'count', value_count) ORDER BY value_count DESC)
           AS value_distribution
FROM stats"""


async def load_users(dsn: str, users: int, chunk: int) -> dict[str, Any]:
    """Generate the users' overrides and their change rows inside PostgreSQL; what was loaded."""
    conn = await asyncpg.connect(dsn)
    started = time.monotonic()
    try:
        for first in range(0, users, chunk):
            await conn.execute(LOAD, first, min(users, first + chunk) - 1)
            if (first // chunk) % 5 == 0:
                log(f"loaded {min(users, first + chunk):,} / {users:,} users")
        await conn.execute("ANALYZE preference_values")
        await conn.execute("ANALYZE changes")
        values = await conn.fetchval("SELECT count(*) FROM preference_values")
    finally:
        await conn.close()
    return {
        "users": users,
        "stored_values": values,
        "change_rows": values,
        "load_s": round(time.monotonic() - started, 1),
    }


async def rebuild(db: BenchDatabase, log_dir: Path) -> dict[str, Any]:
    """`prefd rebuild-statistics` against the loaded database (timed, its output kept)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "rebuild-statistics",
        env=child_env({"DATABASE_URL": db.dsn, "PREFD_LOG_LEVEL": "WARNING"}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    (log_dir / "rebuild.stderr").write_bytes(err)
    if process.returncode != 0:
        raise RuntimeError(f"rebuild-statistics failed; see {log_dir / 'rebuild.stderr'}")
    return {
        "command": "prefd rebuild-statistics",
        "output": out.decode().strip(),
        "s": round(time.monotonic() - started, 1),
    }


async def measure_reads(prefd: ChildServer, tokens: Tokens, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Serial GetKeyStatistics latencies over gRPC; (report, the last answer)."""
    metadata = auth_metadata(tokens.service)
    request = statistics_pb2.GetKeyStatisticsRequest(key=KEY, top_n=10)
    async with grpc.aio.insecure_channel(f"{HOST}:{prefd.port}", options=CHANNEL_OPTIONS) as channel:
        stub = statistics_pb2_grpc.StatisticsServiceStub(channel)
        for _ in range(args.read_warmup):
            await stub.GetKeyStatistics(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        samples = []
        answer = None
        for _ in range(args.reads):
            started = time.monotonic_ns()
            answer = await stub.GetKeyStatistics(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            samples.append(time.monotonic_ns() - started)
        category_samples = []
        category = statistics_pb2.GetCategoryStatisticsRequest(category="display")
        for _ in range(max(1, args.reads // 4)):
            started = time.monotonic_ns()
            await stub.GetCategoryStatistics(category, metadata=metadata, timeout=CALL_TIMEOUT_S)
            category_samples.append(time.monotonic_ns() - started)
    return {
        "calls": len(samples),
        "latency_ms": percentiles_ms(samples),
        "get_category_statistics_display_latency_ms": percentiles_ms(category_samples),
    }, answer


async def measure_baseline(dsn: str, runs: int) -> tuple[dict[str, Any], Any]:
    """The seed's GROUP BY, `runs` times on one connection; (report, its last result)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchrow(SEED_GROUP_BY, KEY)  # warm the cache once
        samples = []
        row = None
        for _ in range(runs):
            started = time.monotonic_ns()
            row = await conn.fetchrow(SEED_GROUP_BY, KEY)
            samples.append(time.monotonic_ns() - started)
    finally:
        await conn.close()
    return {"runs": len(samples), "latency_ms": percentiles_ms(samples)}, row


def same_figures(answer: Any, row: Any) -> bool:
    """prefd's holders and top values equal the seed query's total and distribution."""
    seed = sorted((json.dumps(json.loads(d)["value"]), json.loads(d)["count"]) for d in row["value_distribution"])
    mine = sorted((json.dumps(json.loads(v.value_json)), v.holders) for v in answer.statistics.values)
    return bool(
        answer.statistics.holders == row["total_values"] and seed == mine and answer.statistics.other_holders == 0
    )


async def counted_through(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow("SELECT xid, change_id FROM statistics_position")
    return row["xid"], row["change_id"]


async def wait_counted(conn: asyncpg.Connection, timeout_s: float = 300) -> float:
    """Seconds until the statistics position passes the newest change row."""
    started = time.monotonic()
    target = await conn.fetchrow("SELECT xid::text::bigint AS xid, id FROM changes ORDER BY xid DESC, id DESC LIMIT 1")
    while await counted_through(conn) < (target["xid"], target["id"]):
        if time.monotonic() - started > timeout_s:
            raise RuntimeError("the statistics consumer did not catch up")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def throughput_run(
    mode: str,
    round_no: int,
    args: argparse.Namespace,
    db: BenchDatabase,
    tokens: Tokens,
    work_dir: Path,
    pinning: Pinning,
) -> dict[str, Any]:
    """One closed-loop write window with the consumer on or off."""
    conn = await asyncpg.connect(db.dsn)
    load_before = loadavg_1m()
    try:
        if mode == "consumer_off":  # hold the runner lock: the prefd under test stands by
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK_KEY)
        prefd = await start_prefd(db, tokens, work_dir / f"round{round_no}-{mode}", pinning.server)
        channels: list[grpc.aio.Channel] = []
        try:
            if mode == "consumer_on":
                backlog_s = await wait_counted(conn)
                log(f"consumer caught up with the previous window in {backlog_s:.1f} s")
            channels = [
                grpc.aio.insecure_channel(f"{HOST}:{prefd.port}", options=CHANNEL_OPTIONS) for _ in range(args.channels)
            ]
            stubs = [preferences_pb2_grpc.PreferencesServiceStub(c) for c in channels]
            label = f"r{round_no}{mode}"
            rng = random.Random(round_no)
            if args.warmup > 0:
                await run_load(stubs, tokens.admin, args.clients, args.warmup, f"{label}-warm", rng)
            rows_before = await count_changes(conn)
            assert prefd.proc is not None
            cpu_before = cpu_seconds(prefd.proc.pid)
            load: LoadResult = await run_load(stubs, tokens.admin, args.clients, args.duration, label, rng)
            # The consumer's work on this window's writes may run after the window: counted up to caught up.
            catch_up = round(await wait_counted(conn), 3) if mode == "consumer_on" else None
            cpu = cpu_seconds(prefd.proc.pid) - cpu_before
            rows = await count_changes(conn) - rows_before
        finally:
            for channel in channels:
                await channel.close()
            exit_code = prefd.stop()
    finally:
        await conn.close()
    writes_per_s = load.ok / load.elapsed_s
    log(f"round {round_no} {mode}: {writes_per_s:.0f} writes/s, {load.ok} ok")
    return {
        "round": round_no,
        "mode": mode,
        "writes_per_s": round(writes_per_s, 1),
        "successful_calls": load.ok,
        "failed_calls": dict(load.errors),
        "change_rows_written": rows,
        "latency_ms": percentiles_ms(load.latencies_ns),
        "catch_up_s": catch_up,
        "prefd_cpu_ms_per_write": round(cpu * 1000 / load.ok, 3) if load.ok else None,
        "loadavg_1m_before": load_before,
        "prefd_exit_code": exit_code,
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    async with fresh_database() as db:
        pinning.apply_to_self()
        first = await start_prefd(db, tokens, work_dir / "migrate", pinning.server)  # migrations + definitions
        first.stop()
        log(f"loading {args.users:,} users")
        loaded = await load_users(db.dsn, args.users, args.load_chunk)
        log(f"loaded {loaded['stored_values']:,} values in {loaded['load_s']} s; rebuilding statistics")
        built = await rebuild(db, work_dir)
        log(f"{built['output']} ({built['s']} s)")

        prefd = await start_prefd(db, tokens, work_dir / "reads", pinning.server)
        try:
            reads, answer = await measure_reads(prefd, tokens, args)
        finally:
            prefd.stop()
        baseline, row = await measure_baseline(db.dsn, args.baseline_runs)
        log(f"prefd p50 {reads['latency_ms']['p50']} ms, seed GROUP BY p50 {baseline['latency_ms']['p50']} ms")

        runs = []
        modes = ["consumer_on", "consumer_off"]
        for round_no in range(1, args.rounds + 1):
            for mode in modes if round_no % 2 else list(reversed(modes)):
                runs.append(await throughput_run(mode, round_no, args, db, tokens, work_dir, pinning))

    medians = {
        mode: round(statistics.median(r["writes_per_s"] for r in runs if r["mode"] == mode), 1) for mode in modes
    }
    paired = [
        ratio(
            next(r["writes_per_s"] for r in runs if r["round"] == n and r["mode"] == "consumer_on"),
            next(r["writes_per_s"] for r in runs if r["round"] == n and r["mode"] == "consumer_off"),
        )
        for n in range(1, args.rounds + 1)
    ]
    on_over_off = ratio(medians["consumer_on"], medians["consumer_off"])
    cpu = {mode: median_or_none([r["prefd_cpu_ms_per_write"] for r in runs if r["mode"] == mode]) for mode in modes}
    speedup = ratio(baseline["latency_ms"]["p50"], reads["latency_ms"]["p50"], 1)
    return {
        "benchmark": "statistics reads at scale vs the seed's GROUP BY; SetPreferences throughput, consumer on vs off",
        "data": {
            **loaded,
            "how": "generated inside PostgreSQL (INSERT .. SELECT over generate_series), each stored value with "
            "its change row (version 1); statistics built from the change feed by `prefd rebuild-statistics`",
            "keys": "display.theme (all users), locale.language (60%), display.items_per_page (30%), "
            "notifications.sms.phone_number (5%, sensitive)",
        },
        "rebuild": built,
        "machine": machine,
        "pinning": pinning.describe(),
        "database": db.describe(),
        "read": {
            "request": f"GetKeyStatistics key={KEY} top_n=10, every scope kind, service token, serial, over gRPC",
            **reads,
        },
        "baseline": {
            "query": "seed 000 get_preference_statistics (GROUP BY over the stored values of the key), asyncpg "
            "straight to PostgreSQL, no gRPC",
            **baseline,
        },
        "statistics_equal_group_by": same_figures(answer, row),
        "speedup_p50": speedup,
        "speedup_p99": ratio(baseline["latency_ms"]["p99"], reads["latency_ms"]["p99"], 1),
        "throughput": {
            "parameters": {
                "clients": args.clients,
                "channels": args.channels,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "write": "display.items_per_page at a new USER scope per call, admin token",
                "off": "this process holds the statistics runner's advisory lock; prefd's runner stands by",
            },
            "runs": runs,
            "median_writes_per_s": medians,
            "ratio_on_over_off": on_over_off,
            "paired_round_ratios": paired,
            "median_paired_ratio": median_or_none(paired),
            "median_prefd_cpu_ms_per_write": cpu,
            "ratio_prefd_cpu_per_write_on_over_off": ratio(cpu["consumer_on"], cpu["consumer_off"]),
        },
        "target": {
            "speedup_p50_at_least": TARGET_SPEEDUP,
            "p50_ms_at_most": TARGET_P50_MS,
            "ratio_on_over_off_at_least": TARGET_RATIO,
            "meets_speedup": None if speedup is None else speedup >= TARGET_SPEEDUP,
            "meets_p50": reads["latency_ms"]["p50"] <= TARGET_P50_MS,
            "meets_ratio": None if on_over_off is None else on_over_off >= TARGET_RATIO,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="prefd statistics: reads vs the seed's GROUP BY; writes, consumer on/off."
    )
    parser.add_argument(
        "--users", type=positive_int, default=1_000_000, help="users with overrides (default 1,000,000)"
    )
    parser.add_argument("--load-chunk", type=positive_int, default=50_000, help="users per load transaction")
    parser.add_argument("--reads", type=positive_int, default=2000, help="measured statistics reads (default 2000)")
    parser.add_argument("--read-warmup", type=int, default=200, help="unreported reads first (default 200)")
    parser.add_argument("--baseline-runs", type=positive_int, default=15, help="seed GROUP BY runs (default 15)")
    parser.add_argument("--clients", type=positive_int, default=32, help="concurrent writer tasks (default 32)")
    parser.add_argument("--channels", type=positive_int, default=4, help="client connections (default 4)")
    parser.add_argument("--duration", type=positive_float, default=8.0, help="measured seconds per write run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unreported seconds of writes first (default 1)")
    parser.add_argument("--rounds", type=rounds_arg, default=5, help="rounds of on+off, at least 3 (default 5)")
    add_pin_option(parser, "pin prefd to the first CPU (default on)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-statistics-")


if __name__ == "__main__":
    raise SystemExit(main())
