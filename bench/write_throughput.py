"""Benchmark: SetPreferences throughput with prefd's cross-process feed wake-up (NOTIFY) on vs off.

What it measures
    After each committed write, prefd wakes its own feed reader and, with PREFD_FEED_NOTIFY=true
    (the default), also sends ``NOTIFY prefd_changes`` (coalesced, at most one in flight, on a
    pooled connection outside the write transaction) so other prefd processes read the change at
    once instead of at their next poll (PREFD_FEED_POLL_INTERVAL_S, default 0.1 s). This benchmark
    prices that wake-up: closed-loop write throughput of one prefd process with it on and off.

    Each run starts prefd with PREFD_FEED_NOTIFY=true or =false (nothing else changed), then
    --clients concurrent tasks (default 32, spread over --channels client connections) each make
    single-key USER-scope writes (display.items_per_page, a random value) as fast as their calls
    return, every call to a user no other call writes (so no two calls contend for a scope lock
    and every call stores one change row). After --warmup seconds (default 1) of unreported load,
    the measured window lasts --duration seconds (default 8): calls are started until it ends and
    all are awaited; writes/s = successful calls / (time until the last one returned).

    ``SELECT count(*) FROM changes`` before and after the window gives the change rows written,
    which must equal the successful calls (``rows_match_calls``). The report also gives call
    latency percentiles and the CPU seconds prefd and this client used per second of the window
    (a client near 1.0 is itself the bottleneck).

Rounds
    --rounds rounds (default 5, at least 3), each with one run of each mode; the order alternates
    (on/off, off/on, ...) so drift on a noisy machine hits both modes alike. prefd is restarted for
    every run against the same database (fresh for this benchmark). The report gives every run
    (with the 1-minute load average before it), the medians per mode, the ratio of median
    writes/s on/off (target >= 0.80), and each round's own on/off ratio with their median: the
    two runs of a round are back to back, so on a machine whose background load drifts the
    paired ratios are the steadier figure. prefd's CPU milliseconds per successful write are
    reported too: what the wake-up costs prefd itself, less sensitive to background load than
    writes/s.

Setup and output as in bench/effective_read.py: a fresh database (on DATABASE_URL's server, else an
embedded PostgreSQL started by this script), prefd as a child process, pinned to the first CPU and
this client to the others (--no-pin to disable), PostgreSQL unpinned; one JSON document on stdout,
progress on stderr.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/write_throughput.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.procstats import cpu_seconds
from harness.progress import log
from harness.stats import median_or_none, percentiles_ms, ratio

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc

ORG = "o1"
KEY = "display.items_per_page"  # INT, 1..200, in no cross-field rule
CALL_TIMEOUT_S = 30.0
TARGET_RATIO = 0.80
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
MODES = {"notify_on": "true", "notify_off": "false"}


@dataclass
class LoadResult:
    """What one closed-loop load window did."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


async def write_loop(
    stub: preferences_pb2_grpc.PreferencesServiceAsyncStub,
    token: str,
    user_prefix: str,
    deadline: float,
    result: LoadResult,
    rng: random.Random,
) -> None:
    """Write one key for a new user per call until `deadline` (monotonic seconds)."""
    metadata = auth_metadata(token)
    seq = 0
    while time.monotonic() < deadline:
        request = preferences_pb2.SetPreferencesRequest(
            scope=common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=f"{user_prefix}-{seq}"),
            writes=[
                preferences_pb2.PreferenceWrite(key=KEY, value=common_pb2.TypedValue(int_value=rng.randint(1, 200)))
            ],
            reason="write_throughput benchmark",
            org_id=ORG,
        )
        seq += 1
        started = time.monotonic_ns()
        try:
            response = await stub.SetPreferences(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            result.errors[exc.code().name] += 1
            continue
        result.latencies_ns.append(time.monotonic_ns() - started)
        if len(response.changes) == 1:
            result.ok += 1
        else:
            result.errors[f"{len(response.changes)} changes in the response"] += 1


async def run_load(
    stubs: list[preferences_pb2_grpc.PreferencesServiceAsyncStub],
    token: str,
    clients: int,
    duration_s: float,
    label: str,
    rng: random.Random,
) -> LoadResult:
    """`clients` write loops for `duration_s`; waits for every call started in the window."""
    result = LoadResult()
    started = time.monotonic()
    deadline = started + duration_s
    await asyncio.gather(
        *(write_loop(stubs[i % len(stubs)], token, f"{label}-{i}", deadline, result, rng) for i in range(clients))
    )
    result.elapsed_s = time.monotonic() - started
    return result


async def count_changes(conn: asyncpg.Connection) -> int:
    """Rows in the change table."""
    value: int = await conn.fetchval("SELECT count(*) FROM changes")
    return value


async def measure_mode(
    mode: str,
    round_no: int,
    args: argparse.Namespace,
    db_conn: asyncpg.Connection,
    start: Callable[[str, int], Awaitable[ChildServer]],
    tokens: Tokens,
    rng: random.Random,
) -> dict[str, Any]:
    """Start prefd in `mode`, warm up, measure one window, stop it; the run's record."""
    load_before = loadavg_1m()
    prefd = await start(mode, round_no)
    channels: list[grpc.aio.Channel] = []
    try:
        assert prefd.proc is not None
        target = f"{HOST}:{prefd.port}"
        channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(args.channels)]
        stubs = [preferences_pb2_grpc.PreferencesServiceStub(channel) for channel in channels]
        label = f"r{round_no}{mode}"
        if args.warmup > 0:
            warm = await run_load(stubs, tokens.admin, args.clients, args.warmup, f"{label}-warm", rng)
            if warm.errors:
                log(f"warm-up errors: {dict(warm.errors)}")
        rows_before = await count_changes(db_conn)
        server_cpu_before = cpu_seconds(prefd.proc.pid)
        client_cpu_before = time.process_time()
        load = await run_load(stubs, tokens.admin, args.clients, args.duration, label, rng)
        client_cpu = time.process_time() - client_cpu_before
        server_cpu = cpu_seconds(prefd.proc.pid) - server_cpu_before
        rows = await count_changes(db_conn) - rows_before
    finally:
        for channel in channels:
            await channel.close()
        exit_code = prefd.stop()
    if load.ok == 0:
        raise RuntimeError(f"{mode}: no SetPreferences call succeeded ({dict(load.errors)}); see prefd.stderr")
    writes_per_s = load.ok / load.elapsed_s
    log(f"round {round_no} {mode}: {writes_per_s:.0f} writes/s, {load.ok} ok, {rows} change rows")
    return {
        "round": round_no,
        "mode": mode,
        "writes_per_s": round(writes_per_s, 1),
        "successful_calls": load.ok,
        "failed_calls": dict(load.errors),
        "window_s": round(load.elapsed_s, 3),
        "change_rows_written": rows,
        "rows_match_calls": rows == load.ok,
        "latency_ms": percentiles_ms(load.latencies_ns),
        "prefd_cpu_s_per_s": round(server_cpu / load.elapsed_s, 3),
        "prefd_cpu_ms_per_write": round(server_cpu * 1000 / load.ok, 3),
        "client_cpu_s_per_s": round(client_cpu / load.elapsed_s, 3),
        "loadavg_1m_before": load_before,
        "prefd_exit_code": exit_code,
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Set up, run the alternating rounds, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    rng = random.Random(args.seed)
    runs: list[dict[str, Any]] = []
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned

        async def start(mode: str, round_no: int) -> ChildServer:
            env = {"PREFD_FEED_NOTIFY": MODES[mode]}
            return await start_prefd(db, tokens, work_dir / f"round{round_no}-{mode}", pinning.server, env)

        db_conn = await asyncpg.connect(db.dsn)
        try:
            for round_no in range(1, args.rounds + 1):
                order = list(MODES) if round_no % 2 else list(reversed(MODES))
                for mode in order:
                    log(f"round {round_no}/{args.rounds} {mode}: {args.clients} clients, {args.duration:g} s")
                    runs.append(await measure_mode(mode, round_no, args, db_conn, start, tokens, rng))
        finally:
            await db_conn.close()

    medians: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        medians[mode] = {
            "writes_per_s": round(statistics.median(r["writes_per_s"] for r in mine), 1),
            "latency_p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in mine), 3),
            "latency_p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in mine), 3),
            "prefd_cpu_s_per_s": round(statistics.median(r["prefd_cpu_s_per_s"] for r in mine), 3),
            "prefd_cpu_ms_per_write": round(statistics.median(r["prefd_cpu_ms_per_write"] for r in mine), 3),
            "client_cpu_s_per_s": round(statistics.median(r["client_cpu_s_per_s"] for r in mine), 3),
        }
    on_over_off = ratio(medians["notify_on"]["writes_per_s"], medians["notify_off"]["writes_per_s"])
    # Within a round the two runs are back to back, so they share the machine's background load.
    paired = [
        ratio(
            next(r["writes_per_s"] for r in runs if r["round"] == n and r["mode"] == "notify_on"),
            next(r["writes_per_s"] for r in runs if r["round"] == n and r["mode"] == "notify_off"),
        )
        for n in range(1, args.rounds + 1)
    ]
    return {
        "benchmark": "SetPreferences throughput with the feed NOTIFY wake-up on vs off",
        "baseline": "notify_off: the same prefd with PREFD_FEED_NOTIFY=false (its own feed reader still wakes "
        "on local commits; other processes would only poll)",
        "load_generator_note": "the client (one Python process, grpc.aio) runs on the same machine as prefd and "
        "PostgreSQL; by default it is pinned to the CPUs prefd is not on and shares them with PostgreSQL. "
        "client_cpu_s_per_s near 1.0 means the client, not prefd, limited the rate.",
        "machine": machine,
        "parameters": {
            "clients": args.clients,
            "channels": args.channels,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "order": "notify_on first in odd rounds, notify_off first in even rounds; prefd restarted per run",
            "write": f"one key ({KEY}) at USER scope, a user no other call writes, org_id {ORG}, admin token",
            "seed": args.seed,
            "prefd_settings": "defaults except PREFD_FEED_NOTIFY (pool 2..10 connections, poll 0.1 s, no Redis)",
        },
        "pinning": pinning.describe(),
        "database": db.describe(),
        "runs": runs,
        "median": medians,
        "ratio_writes_per_s_on_over_off": on_over_off,
        "paired_round_ratios_on_over_off": paired,
        "median_paired_ratio_on_over_off": median_or_none(paired),
        "ratio_prefd_cpu_per_write_on_over_off": ratio(
            medians["notify_on"]["prefd_cpu_ms_per_write"], medians["notify_off"]["prefd_cpu_ms_per_write"]
        ),
        "target": {
            "ratio_on_over_off_at_least": TARGET_RATIO,
            "meets_target": None if on_over_off is None else on_over_off >= TARGET_RATIO,
        },
        "all_rows_match_calls": all(r["rows_match_calls"] for r in runs),
        "failed_calls_total": sum(sum(r["failed_calls"].values()) for r in runs),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(description="prefd SetPreferences throughput, feed NOTIFY on vs off.")
    parser.add_argument("--clients", type=positive_int, default=32, help="concurrent writer tasks (default 32)")
    parser.add_argument("--channels", type=positive_int, default=4, help="client connections (default 4)")
    parser.add_argument("--duration", type=positive_float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unreported seconds of load first (default 1)")
    parser.add_argument("--rounds", type=rounds_arg, default=5, help="rounds of on+off, at least 3 (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the values (default 1)")
    add_pin_option(parser, "pin prefd to the first CPU and this client to the rest (default on; needs >= 2 CPUs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-writes-")


if __name__ == "__main__":
    raise SystemExit(main())
