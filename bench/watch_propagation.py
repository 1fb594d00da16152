"""Benchmark: commit-to-watcher latency of prefd's change feed with many open WatchPreferences streams.

What it measures
    One prefd process serves N subject watches (default 1,000): ``WatchPreferences`` for the
    subjects (u0, o1) .. (u<N-1>, o1), opened with a service token over a few client channels
    (separate HTTP/2 connections); every stream's ``started`` message is awaited before writing.
    A single writer (admin token, its own channel) then makes M writes (default 300), one every
    --interval-ms (default 10 ms, open loop: a write starts at its slot, or at once if the previous
    one ran late), each one key (display.items_per_page) at

    * USER scope of a random watched user (single recipient), or
    * ORG o1 (fan-out: every watcher's subject sits in o1), for --org-fraction of the writes
      (default 0.1), placed at random; with --fanout-scope global these go to GLOBAL instead (still
      reported as org_write_*).

    --workers N runs prefd with N server processes (SO_REUSEPORT; each client channel lands on one of
    them); use --no-pin with it so the workers may use every CPU.

    For each write, latency runs from the moment the SetPreferences call returned to this client
    (the write has committed by then) until the matching ChangeEvent (same scope, key and per-key
    version) was read from a watcher's stream. A USER write gives one sample; an ORG write gives the
    time until the first and until the last of the N watchers had it. Events can reach a watcher
    before the writer's response does; those samples are negative and counted as
    ``events_before_response``. After the last write the benchmark waits (--drain-timeout) for
    every expected event; any still missing are ``lost`` (should be 0), and duplicated or
    unexpected events are counted too.

Baseline
    The same measurement with a single watch (N=1, subject u0, so every USER write goes to u0),
    run in the same prefd process, alternating with the N-watch phase, for --rounds rounds
    (default 3; each phase opens fresh streams and closes them afterwards). The report gives every
    round, the medians over rounds, the percentiles of all rounds' samples pooled, and the
    ratios N-watch/baseline of the median p50 and p99.

    Before the rounds, an unreported warm-up phase opens N watches and makes 40 writes (some at
    ORG scope), so every watched user's layers have been cached once.

    The floor (--floor, default on): the N-watch phase, same client and writer code, against
    bench/fanout_floor_server.py instead of prefd: a bare grpc.aio server (no auth, no database, no
    feed) that, for each SetPreferences, builds one serialized ChangeEvent and puts it on every
    covered stream's queue in one synchronous loop, then answers. It is the cheapest fan-out
    grpc.aio allows, so its latencies are what grpc.aio and this load generator cost on this machine;
    what prefd adds is prefd minus floor. It runs as its own child process on prefd's CPUs (started
    once, kept for the whole run like prefd, each idle while the other is measured), with its own
    unreported warm-up phase and its own random write plans (prefd's plans are the same with or
    without it). Each round runs baseline, N-watch, floor (odd rounds) or floor, N-watch, baseline
    (even rounds). Reported as the configuration ``floor`` (every round, medians, pooled) and in
    ``floor_comparison``: prefd's and the floor's first- and last-watcher (and user write) p50 and
    p99 medians, prefd/floor and prefd - floor. The floor fans out before answering the writer, so
    its first-watcher latency can be near zero or negative (ratios are then null; see the
    differences). It has no cache counters (reported as not applicable).

Caveats
    The load generator (this Python process: N stream readers, the writer, the bookkeeping) runs
    on the same machine, by default pinned to the CPUs prefd does not use; PostgreSQL is unpinned.
    Time spent by the client to read and parse events is included in the latencies, and with N
    streams it matters for the ``last watcher`` figures. prefd runs with its defaults (feed NOTIFY
    on, 0.1 s fallback poll, 5 s watch bookmarks, no Redis) plus its Prometheus endpoint
    (PREFD_METRICS_PORT), from which each phase reports how prefd's cache hit and miss counters
    moved during the writes (subject watches resolve each event's effective value, so this shows
    how many layer reads the fan-out cost).

Setup and output as in bench/effective_read.py: a fresh database (on DATABASE_URL's server, else an
embedded PostgreSQL), prefd as a child process, one JSON document on stdout, progress on stderr.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/watch_propagation.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, start_fanout_floor, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import BenchDatabase, fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.progress import log
from harness.prometheus import free_tcp_port, scrape_counters
from harness.stats import median_or_none, percentiles_ms, ratio
from harness.streams import StreamSet

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc

ORG = "o1"
KEY = "display.items_per_page"  # INT, 1..200, overridable at every scope, in no cross-field rule
MAX_VALUE = 200
USER_KIND = common_pb2.SCOPE_KIND_USER
ORG_KIND = common_pb2.SCOPE_KIND_ORG
WARMUP_WRITES = 40
OPEN_TIMEOUT_S = 120.0
# One TCP connection per channel (no subchannel shared between channels).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# Each latency's targets (ms) with 1,000 watchers: where the N-watch medians should land.
TARGETS: dict[str, dict[str, float]] = {
    "user_write_to_watcher_ms": {"p50": 5.0, "p99": 25.0},
    "org_write_to_first_watcher_ms": {"p50": 5.0},
    "org_write_to_last_watcher_ms": {"p99": 50.0},
}
TARGET_WATCHERS = 1000
GLOBAL_KIND = common_pb2.SCOPE_KIND_GLOBAL
FLOOR_COUNTERS = "not applicable: the floor server has no cache and no metrics endpoint"

MatchKey = tuple[int, str, str, int]  # scope kind, scope id, key, per-key version


# --------------------------------------------------------------------------- watchers


class WatchFleet(StreamSet):
    """Subject watches for `users` (all in ORG), recording when each change event reaches each stream."""

    def __init__(self, channels: list[grpc.aio.Channel], token: str, users: list[str]) -> None:
        super().__init__()
        self._stubs = [preferences_pb2_grpc.PreferencesServiceStub(channel) for channel in channels]
        self._metadata = auth_metadata(token)
        self.users = users
        self.arrivals: dict[MatchKey, dict[int, int]] = {}  # event -> {watcher index: monotonic ns}
        self.started = 0
        self.progress = 0
        self.duplicates = 0
        self.errors: list[str] = []

    async def open(self, timeout_s: float = OPEN_TIMEOUT_S) -> float:
        """Open every stream and wait for each `started`; the seconds it took."""
        started_at = time.monotonic()
        for index, user in enumerate(self.users):
            request = preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=user, org_id=ORG))
            call = self._stubs[index % len(self._stubs)].WatchPreferences(request, metadata=self._metadata)
            self._calls.append(call)
            self._tasks.append(asyncio.create_task(self._read(index, call)))
            if index % 100 == 99:
                await asyncio.sleep(0)  # let the readers send their requests as we go
        deadline = started_at + timeout_s
        while self.started < len(self.users):
            if self.errors:
                raise RuntimeError(f"{len(self.errors)} watch streams failed while opening: {self.errors[:3]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.started}/{len(self.users)} watches started after {timeout_s:.0f} s")
            await asyncio.sleep(0.01)
        return time.monotonic() - started_at

    async def _read(self, index: int, call: Any) -> None:
        try:
            async for response in call:
                now = time.monotonic_ns()
                which = response.WhichOneof("message")
                if which == "change":
                    change = response.change
                    key = (change.scope.kind, change.scope.id, change.key, change.version)
                    seen = self.arrivals.get(key)
                    if seen is None:
                        self.arrivals[key] = {index: now}
                    elif index in seen:
                        self.duplicates += 1
                    else:
                        seen[index] = now
                elif which == "started":
                    self.started += 1
                elif which == "progress":
                    self.progress += 1
                else:
                    self.errors.append(f"watch {index}: unexpected {which} message")
            if not self._closing:
                self.errors.append(f"watch {index}: stream ended")
        except grpc.aio.AioRpcError as exc:
            if not self._closing:
                self.errors.append(f"watch {index}: {exc.code().name} {exc.details()}")


# --------------------------------------------------------------------------- writer


@dataclass
class WriteRecord:
    """One SetPreferences call and which watchers should see its event."""

    kind: str  # "user" or "org"
    match: MatchKey | None  # None: the call changed nothing (no event expected)
    recipients: list[int]
    due_ns: int
    call_ns: int
    return_ns: int


@dataclass
class Writer:
    """Writes KEY at USER or ORG scope, always to a value different from the scope's previous one."""

    stub: preferences_pb2_grpc.PreferencesServiceAsyncStub
    token: str
    last_value: dict[tuple[common_pb2.ScopeKind.ValueType, str], int] = field(default_factory=dict)

    async def write(self, kind: common_pb2.ScopeKind.ValueType, scope_id: str) -> tuple[MatchKey | None, int, int]:
        """One write; (event match key or None, call start ns, call return ns)."""
        value = self.last_value.get((kind, scope_id), 0) % MAX_VALUE + 1
        self.last_value[(kind, scope_id)] = value
        request = preferences_pb2.SetPreferencesRequest(
            scope=common_pb2.Scope(kind=kind, id=scope_id),
            writes=[preferences_pb2.PreferenceWrite(key=KEY, value=common_pb2.TypedValue(int_value=value))],
            reason="watch_propagation benchmark",
            org_id=ORG if kind == USER_KIND else "",
        )
        call_ns = time.monotonic_ns()
        response = await self.stub.SetPreferences(request, metadata=auth_metadata(self.token), timeout=30)
        return_ns = time.monotonic_ns()
        if not response.changes:
            return None, call_ns, return_ns
        return (kind, scope_id, KEY, response.changes[0].new_version), call_ns, return_ns


def write_plan(writes: int, org_fraction: float, watchers: int, rng: random.Random) -> list[tuple[str, int]]:
    """(kind, watcher index) per write: round(writes * org_fraction) ORG writes at random places."""
    org_writes = round(writes * org_fraction)
    kinds = ["org"] * org_writes + ["user"] * (writes - org_writes)
    rng.shuffle(kinds)
    return [(kind, rng.randrange(watchers)) for kind in kinds]


async def paced_writes(
    writer: Writer,
    fleet: WatchFleet,
    plan: list[tuple[str, int]],
    interval_s: float,
    fanout_scope: tuple[common_pb2.ScopeKind.ValueType, str],
) -> list[WriteRecord]:
    """Run the plan, one write per interval slot (open loop, one write in flight); the fan-out writes go
    to `fanout_scope` (ORG o1, or GLOBAL), which every watcher's subject sits in."""
    records: list[WriteRecord] = []
    everyone = list(range(len(fleet.users)))
    start_ns = time.monotonic_ns()
    for slot, (kind, target) in enumerate(plan):
        due_ns = start_ns + int(slot * interval_s * 1e9)
        delay_ns = due_ns - time.monotonic_ns()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / 1e9)
        if kind == "org":
            match, call_ns, return_ns = await writer.write(*fanout_scope)
            recipients = everyone
        else:
            match, call_ns, return_ns = await writer.write(USER_KIND, fleet.users[target])
            recipients = [target]
        records.append(WriteRecord(kind, match, recipients if match else [], due_ns, call_ns, return_ns))
    return records


async def wait_delivered(fleet: WatchFleet, records: list[WriteRecord], timeout_s: float) -> float:
    """Wait until every expected event arrived (or the timeout); the seconds waited."""
    expected = sum(len(r.recipients) for r in records)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        delivered = sum(len(fleet.arrivals.get(r.match, ())) for r in records if r.match is not None)
        if delivered >= expected or fleet.errors:
            break
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseSamples:
    """Raw latency samples (ns) of one phase."""

    user: list[int] = field(default_factory=list)
    org_first: list[int] = field(default_factory=list)
    org_last: list[int] = field(default_factory=list)


def analyse(fleet: WatchFleet, records: list[WriteRecord]) -> tuple[dict[str, Any], PhaseSamples]:
    """Latencies, losses and oddities of one phase."""
    samples = PhaseSamples()
    lost = early = 0
    lost_writes = 0
    for record in records:
        if record.match is None:
            continue
        got = fleet.arrivals.get(record.match, {})
        missing = sum(1 for index in record.recipients if index not in got)
        lost += missing
        lost_writes += missing > 0
        times = [got[index] - record.return_ns for index in record.recipients if index in got]
        early += sum(1 for t in times if t < 0)
        if not times:
            continue
        if record.kind == "user":
            samples.user.extend(times)
        else:
            samples.org_first.append(min(times))
            if not missing:
                samples.org_last.append(max(times))
    expected_keys = {r.match for r in records if r.match is not None}
    unexpected = sum(len(v) for k, v in fleet.arrivals.items() if k not in expected_keys)
    rpc_ns = [r.return_ns - r.call_ns for r in records]
    slip = percentiles_ms([max(0, r.call_ns - r.due_ns) for r in records])
    summary = {
        "writes": {
            "user": sum(r.kind == "user" for r in records),
            "org": sum(r.kind == "org" for r in records),
            "without_change": sum(r.match is None for r in records),
        },
        "expected_deliveries": sum(len(r.recipients) for r in records),
        "user_write_to_watcher_ms": percentiles_ms(samples.user),
        "org_write_to_first_watcher_ms": percentiles_ms(samples.org_first),
        "org_write_to_last_watcher_ms": percentiles_ms(samples.org_last),
        "lost_events": lost,
        "writes_with_lost_events": lost_writes,
        "duplicate_events": fleet.duplicates,
        "unexpected_events": unexpected,
        "events_before_response": early,
        "stream_errors": len(fleet.errors),
        "stream_error_examples": fleet.errors[:3],
        "progress_bookmarks_received": fleet.progress,
        "set_preferences_rpc_ms": percentiles_ms(rpc_ns),
        "writer_behind_schedule_ms": {"p50": slip["p50"], "max": slip["max"]},
    }
    return summary, samples


async def cache_counters(metrics_port: int | None) -> dict[str, float] | str:
    """prefd's cache hit/miss counters by layer ({"misses_l1": ...}), or why they could not be read (the
    floor server, metrics_port None, has none)."""
    if metrics_port is None:
        return FLOOR_COUNTERS
    try:
        raw = await scrape_counters(metrics_port, "prefd_cache_")
    except OSError as exc:
        return f"metrics endpoint unavailable: {exc}"
    counters = {}
    for name, value in raw.items():
        metric, _, labels = name.partition("{")
        if metric.endswith("_total"):
            layer = labels.partition('"')[2].partition('"')[0]
            counters[f"{metric.removeprefix('prefd_cache_').removesuffix('_total')}_{layer}"] = value
    return counters


def counter_deltas(before: dict[str, float] | str, after: dict[str, float] | str) -> dict[str, float] | str:
    """after - before per counter (or the reason there are none)."""
    if isinstance(before, str):
        return before
    if isinstance(after, str):
        return after
    return {name: value - before.get(name, 0.0) for name, value in sorted(after.items())}


async def run_phase(
    channels: list[grpc.aio.Channel],
    writer: Writer,
    tokens: Tokens,
    watchers: int,
    writes: int,
    args: argparse.Namespace,
    rng: random.Random,
    metrics_port: int | None,
) -> tuple[dict[str, Any], PhaseSamples]:
    """Open `watchers` streams, make `writes` paced writes, wait for delivery, close; the phase's results."""
    fleet = WatchFleet(channels, tokens.service, [f"u{i}" for i in range(watchers)])
    try:
        open_s = await fleet.open()
        await asyncio.sleep(args.settle)  # let the open burst's aftermath (GC, bookkeeping) pass
        plan = write_plan(writes, args.org_fraction, watchers, rng)
        counters_before = await cache_counters(metrics_port)
        started = time.monotonic()
        fanout_scope = (GLOBAL_KIND, "") if args.fanout_scope == "global" else (ORG_KIND, ORG)
        records = await paced_writes(writer, fleet, plan, args.interval_ms / 1000, fanout_scope)
        write_s = time.monotonic() - started
        drain_s = await wait_delivered(fleet, records, args.drain_timeout)
        counters = counter_deltas(counters_before, await cache_counters(metrics_port))
        summary, samples = analyse(fleet, records)
    finally:
        await fleet.close()
    await asyncio.sleep(0.3)  # the server notices the cancellations and unsubscribes
    timing = {"open_s": round(open_s, 2), "write_s": round(write_s, 2), "drain_s": round(drain_s, 3)}
    return {"watchers": watchers, **timing, **summary, "prefd_cache_counters_during_writes": counters}, samples


# --------------------------------------------------------------------------- report


METRICS = ("user_write_to_watcher_ms", "org_write_to_first_watcher_ms", "org_write_to_last_watcher_ms")


def summarize(rounds: list[dict[str, Any]], pooled: PhaseSamples) -> dict[str, Any]:
    """Medians over rounds, pooled percentiles and totals of one configuration."""
    median = {
        metric: {q: median_or_none([r[metric][q] for r in rounds]) for q in ("p50", "p90", "p99", "max")}
        for metric in METRICS
    }
    return {
        "median_of_rounds": median,
        "pooled_over_rounds": {
            "user_write_to_watcher_ms": percentiles_ms(pooled.user),
            "org_write_to_first_watcher_ms": percentiles_ms(pooled.org_first),
            "org_write_to_last_watcher_ms": percentiles_ms(pooled.org_last),
        },
        "lost_events_total": sum(r["lost_events"] for r in rounds),
        "duplicate_events_total": sum(r["duplicate_events"] for r in rounds),
        "unexpected_events_total": sum(r["unexpected_events"] for r in rounds),
        "stream_errors_total": sum(r["stream_errors"] for r in rounds),
        "set_preferences_rpc_p50_ms_median": median_or_none([r["set_preferences_rpc_ms"]["p50"] for r in rounds]),
    }


def target_check(summary: dict[str, Any], watchers: int) -> dict[str, Any]:
    """The targets next to the N-watch medians (informational; this is not a pass/fail test)."""
    median = summary["median_of_rounds"]
    checks: dict[str, Any] = {
        "targets_ms": TARGETS,
        "targets_for_watchers": TARGET_WATCHERS,
        "measured_with_watchers": watchers,
        "evaluated_on": "median over rounds of each round's percentile",
    }
    for metric, targets in TARGETS.items():
        checks[metric] = {}
        for q, target in targets.items():
            value = median[metric][q]
            checks[metric][q] = value
            checks[metric][f"{q}_meets_target"] = None if value is None else value <= target
    return checks


@dataclass
class Target:
    """A server the phases run against: its client channels, its writer and where its cache counters are."""

    watch_channels: list[grpc.aio.Channel]
    writer: Writer
    metrics_port: int | None  # None: the floor server (no counters)
    rng: random.Random


def connect(port: int, token: str, count: int) -> tuple[list[grpc.aio.Channel], Writer]:
    """`count` watch channels plus the writer's own channel to 127.0.0.1:`port` (the writer's channel last)."""
    target = f"{HOST}:{port}"
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(count + 1)]
    return channels, Writer(preferences_pb2_grpc.PreferencesServiceStub(channels[-1]), token)


def floor_comparison(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """prefd's N-watch medians next to the floor's: prefd/floor and prefd - floor, per metric and percentile."""
    prefd, floor = summaries["watchers"]["median_of_rounds"], summaries["floor"]["median_of_rounds"]
    comparison: dict[str, Any] = {"evaluated_on": "median over rounds of each round's percentile"}
    for metric in METRICS:
        comparison[metric] = {}
        for q in ("p50", "p99"):
            ours, theirs = prefd[metric][q], floor[metric][q]
            comparison[metric][q] = {
                "prefd_ms": ours,
                "floor_ms": theirs,
                "prefd_over_floor": ratio(ours, theirs),
                "prefd_minus_floor_ms": None if ours is None or theirs is None else round(ours - theirs, 3),
            }
    return comparison


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Set up, warm up, measure the alternating rounds, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    rng = random.Random(args.seed)
    # name -> (server, watchers); the floor has its own write plans so prefd's stay as without it.
    configs = {"baseline": ("prefd", 1), "watchers": ("prefd", args.watchers)}
    if args.floor:
        configs["floor"] = ("floor", args.watchers)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    pooled = {name: PhaseSamples() for name in configs}
    db: BenchDatabase
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned
        metrics_port = free_tcp_port()
        metrics_env = {
            "PREFD_METRICS_PORT": str(metrics_port),
            "PREFD_METRICS_HOST": HOST,
            "PREFD_WORKERS": str(args.workers),
        }
        prefd = await start_prefd(db, tokens, work_dir, pinning.server, metrics_env)
        floor: ChildServer | None = None
        channels: list[grpc.aio.Channel] = []
        floor_exit_code: int | None = None
        try:
            prefd_channels, writer = connect(prefd.port, tokens.admin, args.channels)
            channels += prefd_channels  # the writer's channel is closed with the others; not used for watches
            targets = {"prefd": Target(prefd_channels[:-1], writer, metrics_port, rng)}
            if args.floor:
                floor = await start_fanout_floor(work_dir, pinning.server)
                floor_channels, floor_writer = connect(floor.port, tokens.admin, args.channels)
                channels += floor_channels
                floor_rng = random.Random(f"{args.seed}/floor")
                targets["floor"] = Target(floor_channels[:-1], floor_writer, None, floor_rng)

            for server, target in targets.items():
                log(f"warm-up {server}: {args.watchers} watches, {WARMUP_WRITES} writes")
                warm, _ = await run_phase(
                    target.watch_channels,
                    target.writer,
                    tokens,
                    args.watchers,
                    WARMUP_WRITES,
                    args,
                    target.rng,
                    target.metrics_port,
                )
                if warm["lost_events"] or warm["stream_errors"]:
                    log(f"warm-up {server} lost {warm['lost_events']} events, {warm['stream_errors']} stream errors")
            for round_no in range(1, args.rounds + 1):
                # Alternate which configuration goes first, so slow drift hits all alike.
                order = list(configs.items()) if round_no % 2 else list(reversed(configs.items()))
                for name, (server, watchers) in order:
                    target = targets[server]
                    log(f"round {round_no}/{args.rounds} {name}: {watchers} watches, {args.writes} writes")
                    load_before = loadavg_1m()
                    result, samples = await run_phase(
                        target.watch_channels,
                        target.writer,
                        tokens,
                        watchers,
                        args.writes,
                        args,
                        target.rng,
                        target.metrics_port,
                    )
                    rounds[name].append({"round": round_no, "loadavg_1m_before": load_before, **result})
                    pooled[name].user += samples.user
                    pooled[name].org_first += samples.org_first
                    pooled[name].org_last += samples.org_last
                    user, first = result["user_write_to_watcher_ms"], result["org_write_to_first_watcher_ms"]
                    last = result["org_write_to_last_watcher_ms"]
                    log(
                        f"round {round_no}/{args.rounds} {name}: user p50 {user['p50']} ms p99 {user['p99']} ms; "
                        f"org first p50 {first['p50']} ms; org last p50 {last['p50']} ms p99 {last['p99']} ms; "
                        f"lost {result['lost_events']}"
                    )
        finally:
            for channel in channels:
                await channel.close()
            if floor is not None:
                floor_exit_code = floor.stop()
            exit_code = prefd.stop()

    summaries = {name: summarize(rounds[name], pooled[name]) for name in configs}
    base, main = summaries["baseline"]["median_of_rounds"], summaries["watchers"]["median_of_rounds"]
    ratios = {
        f"{metric}_{q}_watchers_over_baseline": ratio(main[metric][q], base[metric][q])
        for metric in METRICS
        for q in ("p50", "p99")
    }
    if args.floor:
        floor_median = summaries["floor"]["median_of_rounds"]
        ratios |= {
            f"{metric}_{q}_watchers_over_floor": ratio(main[metric][q], floor_median[metric][q])
            for metric in ("org_write_to_first_watcher_ms", "org_write_to_last_watcher_ms")
            for q in ("p50", "p99")
        }
    pinning_report = pinning.describe()
    if args.floor:
        pinning_report["fanout_floor_server"] = sorted(pinning.server) if pinning.server else "not pinned"
    order = "baseline first in odd rounds, the N-watch phase first in even rounds"
    if args.floor:
        order = "baseline, N-watch, floor in odd rounds; floor, N-watch, baseline in even rounds"
    return {
        "benchmark": "WatchPreferences commit-to-watcher latency with many open streams vs one stream",
        "latency_definition": "from the SetPreferences call returning to the writer (commit done) until the "
        "matching ChangeEvent (scope, key, version) was read from the watcher's stream; negative when the "
        "event beat the response (counted as events_before_response)",
        "load_generator_note": "the client (all watch readers and the writer, one Python process) runs on the "
        "same machine as prefd and PostgreSQL; by default it is pinned to the CPUs prefd is not on, so with "
        f"{machine['usable_cpus']} CPUs it shares cores with PostgreSQL. Client-side parsing of every event is "
        "inside the measured latency (most visible in org_write_to_last_watcher).",
        "floor_definition": "bench/fanout_floor_server.py: a bare grpc.aio server (default options, no "
        "interceptors, no auth, no database) measured with the same client, watchers and writer code as prefd's "
        "N-watch phase; per write it builds one serialized ChangeEvent and puts it on every covered stream's "
        "queue in one synchronous loop, then answers the writer (so its events may beat the response). Its "
        "latencies are grpc.aio's and this load generator's own cost; prefd minus floor is prefd's."
        if args.floor
        else None,
        "machine": machine,
        "parameters": {
            "watchers": args.watchers,
            "baseline_watchers": 1,
            "writes_per_phase": args.writes,
            "org_fraction": args.org_fraction,
            "fanout_scope": "GLOBAL" if args.fanout_scope == "global" else f"ORG {ORG}",
            "prefd_workers": args.workers,
            "interval_ms": args.interval_ms,
            "rounds": args.rounds,
            "order": order,
            "watch_channels": args.channels,
            "key": KEY,
            "subjects": f"u0..u{args.watchers - 1} in org {ORG}",
            "tokens": "watchers: service role; writer: admin role",
            "warmup": f"{args.watchers} watches, {WARMUP_WRITES} writes, not reported",
            "settle_s_before_writes": args.settle,
            "drain_timeout_s": args.drain_timeout,
            "seed": args.seed,
            "prefd_settings": "defaults (PREFD_FEED_NOTIFY=true, poll 0.1 s, bookmarks every 5 s, no Redis); "
            "PREFD_METRICS_PORT set to read the cache counters",
            "floor": args.floor,
            "floor_phase": f"{args.watchers} watches, {args.writes} writes per round, its own channels and "
            f"writer, write plans from seed '{args.seed}/floor'; warm-up {args.watchers} watches, "
            f"{WARMUP_WRITES} writes, not reported"
            if args.floor
            else "not run (--no-floor)",
        },
        "pinning": pinning_report,
        "database": db.describe(),
        "baseline": {"watchers": 1, "rounds": rounds["baseline"], **summaries["baseline"]},
        "watchers": {"watchers": args.watchers, "rounds": rounds["watchers"], **summaries["watchers"]},
        "floor": {
            "watchers": args.watchers,
            "server": "bench/fanout_floor_server.py",
            "rounds": rounds["floor"],
            **summaries["floor"],
        }
        if args.floor
        else None,
        "ratios": ratios,
        "floor_comparison": floor_comparison(summaries) if args.floor else None,
        "targets": target_check(summaries["watchers"], args.watchers),
        "lost_events_total": sum(s["lost_events_total"] for s in summaries.values()),
        "prefd_exit_code": exit_code,
        "floor_exit_code": floor_exit_code,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(description="Commit-to-watcher latency of prefd with N open watches vs one.")
    parser.add_argument("--watchers", type=positive_int, default=1000, help="open watch streams (default 1000)")
    parser.add_argument("--writes", type=positive_int, default=300, help="writes per phase (default 300)")
    parser.add_argument(
        "--org-fraction", type=float, default=0.1, help="share of writes at ORG scope, fanned out to all (default 0.1)"
    )
    parser.add_argument("--interval-ms", type=positive_float, default=10.0, help="write pacing (default 10 ms)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds, at least 3 (default 3)")
    parser.add_argument("--channels", type=positive_int, default=4, help="client connections for watches (default 4)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between opening and writing (default 1)")
    parser.add_argument("--drain-timeout", type=positive_float, default=15.0, help="wait for late events (default 15)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the write plan (default 1)")
    parser.add_argument(
        "--fanout-scope",
        choices=("org", "global"),
        default="org",
        help="where the fan-out writes go: ORG o1 or GLOBAL (default org; reported under org_write_*)",
    )
    parser.add_argument("--workers", type=positive_int, default=1, help="prefd --workers (default 1)")
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the N-watch phase against bench/fanout_floor_server.py, a bare grpc.aio floor (default on)",
    )
    add_pin_option(parser, "pin prefd to the first CPU and this client to the rest (default on; needs >= 2 CPUs)")
    args = parser.parse_args(argv)
    if not 0 <= args.org_fraction <= 1:
        parser.error("--org-fraction must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-watch-")


if __name__ == "__main__":
    raise SystemExit(main())
