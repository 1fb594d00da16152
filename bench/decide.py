"""Benchmark: prefd's NotificationService.Decide and DecideBatch against bare grpc.aio baselines.

What it measures
    1. dry_run: ``Decide`` with consume=false, throughput under h2load, against bench/echo_server.py
       replaying a captured prefd answer to the same request. The request is a realistic one: a
       user in an org, an event (type LARGE_LOSS, category trading) with data and three candidate
       channels (EMAIL, PUSH, IN_APP), decided by a GLOBAL event rule with a condition on the data
       (loss >= 1000) plus an ORG and a USER override (push and in-app switches).
    2. consume: the same kind of Decide for event ORDER_FILLED, whose GLOBAL rule also throttles
       (10,000 per 60 minutes, the largest limit a rule may have), with consume=true and an empty
       idempotency key (a charge without idempotency, which the contract allows; h2load sends one
       fixed body, so a key could not differ per call). Every call is allowed and charges prefd's
       throttle counter in Redis: each prefd h2load run decides for a user of its own (bench-c001-<run>,
       bench-c002-<run>, ..., all in the org), so no run's counter comes near the limit (a run charging
       more than 9,000 times fails and asks for a shorter --duration). The echo server again
       replays a captured answer.
    3. batch: ``DecideBatch`` for 1,000 recipients (one org, the LARGE_LOSS event, consume=false):
       --batch-calls sequential calls from a grpc.aio client after --batch-warmup unmeasured ones
       (so the settings cache is warm); p50/p90/p99 in ms, against the same client calling an echo
       server that replays prefd's captured 1,000-decision answer.
    4. exactness: a second prefd process on the same database and Redis; a rule limiting event
       BIG_MOVE to 5 per 60 minutes for one user (USER scope); once both processes see it, 200
       concurrent consuming Decides (distinct idempotency keys, alternating between the two
       processes). Exactly 5 must be SEND_NOW and 195 SUPPRESS; the same 200 calls retried must get
       the same answers (nothing charged twice).

    Phases 1 and 2 run echo then prefd, alternating, for --rounds rounds (at least 3), h2load as in
    bench/effective_read.py (same load generator and settings for both servers). h2load sees only
    HTTP status, so correctness is checked separately: one real call each must return the expected
    decision, one fixed-count h2load run per server must receive exactly one full response message
    per request, and every timed run at least that many bytes. For phase 2 the run's counter is
    read back (a dry Decide's throttle.remaining) around every prefd h2load run: the fixed-count run
    must have charged exactly once per request, a timed run at least once per success.

Setup
    A fresh database (harness.database: on DATABASE_URL's server, else an embedded PostgreSQL),
    dropped at the end. REDIS_URL is required and handed to prefd (both processes); the counters
    the run charged are left there to expire with their windows. prefd and the
    echo servers are child processes; with at least two CPUs they are pinned to the first CPU and
    the load generators (this process, h2load) to the others; PostgreSQL and Redis stay unpinned
    (--no-pin disables all pinning).

Output
    One JSON document on stdout (headline numbers under "summary"); progress on stderr.

Run it (from the repository root):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/decide.py --duration 3 --rounds 3 --batch-calls 45
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, spawn_echo, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import BenchDatabase, fresh_database
from harness.entry import run_main
from harness.h2load import H2loadParams, check_h2load_exact, grpc_frame, run_h2load
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.progress import log
from harness.stats import percentiles_ms, ratio

from prefd.v1 import common_pb2, notifications_pb2, notifications_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from prefd_server.rpc import convert

N = notifications_pb2
DECIDE = "/prefd.v1.NotificationService/Decide"
DECIDE_BATCH = "/prefd.v1.NotificationService/DecideBatch"
ORG = "bench-org"
SUBJECT = common_pb2.Subject(user_id="bench-user", org_id=ORG)
BATCH_SIZE = 1000
# Throttle counters live in Redis, which outlives the run's database: the throttled users are new each run.
RUN_TAG = secrets.token_hex(4)
EXACT_USER = f"bench-throttle-{RUN_TAG}"
EXACT_EVENT = "BIG_MOVE"
EXACT_LIMIT = 5
EXACT_CALLS = 200
CHARGE_LIMIT = 10_000  # the largest throttle_limit an event rule may have
CHARGE_HEADROOM = 9_000  # charges per counter that keep "<remaining> left" in the trace at 4 digits
TARGETS = {"dry_run_req_per_s_ratio": 0.70, "consume_req_per_s_ratio": 0.50, "batch_p50_ms": 50.0}
UNLIMITED_MESSAGES = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]

GLOBAL_RULES = {
    "LARGE_LOSS": {
        "enabled": True,
        "channels": ["EMAIL", "PUSH", "IN_APP"],
        "conditions": {"loss": {"min": 1000}},
    },
    "ORDER_FILLED": {
        "enabled": True,
        "channels": ["EMAIL", "PUSH", "IN_APP"],
        "throttle_minutes": 60,
        "throttle_limit": CHARGE_LIMIT,
        "conditions": {"quantity": {"min": 1}},
    },
}
EXACT_RULES = {EXACT_EVENT: {"enabled": True, "throttle_minutes": 60, "throttle_limit": EXACT_LIMIT}}
SENT = {"EMAIL", "PUSH", "IN_APP"}


def event(event_type: str, data: dict[str, Any]) -> notifications_pb2.Event:
    """An event of category trading with `data` and the three candidate channels."""
    message = N.Event(
        event_type=event_type, category="trading", channels=[N.CHANNEL_EMAIL, N.CHANNEL_PUSH, N.CHANNEL_IN_APP]
    )
    message.data.update(data)
    return message


LOSS_EVENT = event("LARGE_LOSS", {"loss": 2500.5, "symbol": "ACME", "account": "acc-42", "currency": "EUR"})
FILL_EVENT = event("ORDER_FILLED", {"quantity": 100, "symbol": "ACME", "side": "buy", "price": 12.34})
DRY_REQUEST = N.DecideRequest(subject=SUBJECT, event=LOSS_EVENT)


def consume_subject(n: int) -> common_pb2.Subject:
    """The n-th user whose ORDER_FILLED counter one consuming h2load run charges (same length for every n)."""
    return common_pb2.Subject(user_id=f"bench-c{n:03d}-{RUN_TAG}", org_id=ORG)


def consume_request(n: int) -> notifications_pb2.DecideRequest:
    """A consuming Decide of ORDER_FILLED for the n-th counter's user, without idempotency key."""
    return N.DecideRequest(subject=consume_subject(n), event=FILL_EVENT, consume=True)


def batch_request() -> notifications_pb2.DecideBatchRequest:
    """DecideBatch for BATCH_SIZE users of the org and the LARGE_LOSS event, not consuming."""
    subjects = [common_pb2.Subject(user_id=f"bench-batch-{i:04d}", org_id=ORG) for i in range(BATCH_SIZE)]
    return N.DecideBatchRequest(subjects=subjects, event=LOSS_EVENT)


def actions(decision: notifications_pb2.Decision) -> dict[str, str]:
    """Channel name -> action name."""
    return {
        N.Channel.Name(c.channel).removeprefix("CHANNEL_"): N.Action.Name(c.action).removeprefix("ACTION_")
        for c in decision.channels
    }


def expect_all_sent(decision: notifications_pb2.Decision, what: str) -> None:
    """Raise unless every candidate channel is SEND_NOW."""
    got = actions(decision)
    if got != dict.fromkeys(SENT, "SEND_NOW"):
        raise RuntimeError(f"{what}: expected SEND_NOW on {sorted(SENT)}, got {got}")


async def set_preferences(port: int, token: str, scope: common_pb2.Scope, values: dict[str, Any]) -> None:
    """One SetPreferences call writing `values` at `scope`."""
    request = preferences_pb2.SetPreferencesRequest(
        scope=scope,
        writes=[preferences_pb2.PreferenceWrite(key=k, value=convert.value_to_pb(v)) for k, v in values.items()],
        reason="benchmark setup",
    )
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        await stub.SetPreferences(request, metadata=auth_metadata(token), timeout=30)


async def seed(port: int, admin: str, consume_users: int) -> None:
    """The GLOBAL event rules, an ORG override, and a USER override for each single-user Decide's user."""
    await set_preferences(
        port, admin, common_pb2.Scope(kind=common_pb2.SCOPE_KIND_GLOBAL), {"notifications.event_rules": GLOBAL_RULES}
    )
    await set_preferences(
        port, admin, common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=ORG), {"notifications.push.enabled": True}
    )
    for subject in [SUBJECT, *(consume_subject(n) for n in range(consume_users))]:
        await set_preferences(
            port,
            admin,
            common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=subject.user_id),
            {"notifications.in_app.enabled": True},
        )


async def call_raw(port: int, token: str | None, method: str, request: bytes) -> bytes:
    """One call with raw bytes in and out."""
    async with grpc.aio.insecure_channel(f"{HOST}:{port}", options=UNLIMITED_MESSAGES) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        response: bytes = await call(request, metadata=auth_metadata(token), timeout=60)
        return response


async def remaining(port: int, token: str, subject: common_pb2.Subject) -> int:
    """The ORDER_FILLED throttle's remaining sends for `subject` (a dry Decide)."""
    peek = N.DecideRequest(subject=subject, event=FILL_EVENT)
    reply = N.DecideResponse.FromString(await call_raw(port, token, DECIDE, peek.SerializeToString()))
    state = reply.decision.throttle
    if state.limit != CHARGE_LIMIT or state.store != "redis":
        raise RuntimeError(f"unexpected ORDER_FILLED throttle state: {state}")
    return state.remaining


def throughput_medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median req/s and h2load mean request time over the rounds of one server."""
    return {
        key: round(float(statistics.median(float(r[key]) for r in rounds)), 1)
        for key in ("req_per_s", "request_time_mean_us")
    }


class Bench:
    """One run's servers, tokens and settings."""

    def __init__(self, args: argparse.Namespace, work_dir: Path, pinning: Pinning, tokens: Tokens) -> None:
        self.args = args
        self.work_dir = work_dir
        self.pinning = pinning
        self.tokens = tokens
        load_cpus = pinning.client or os.sched_getaffinity(0)
        self.params = H2loadParams(
            duration_s=args.duration,
            warmup_s=args.warmup,
            clients=args.clients,
            streams=args.streams,
            threads=args.threads or min(len(load_cpus), args.clients),
        )

    async def start_echo(self, name: str, method: str, response: bytes) -> ChildServer:
        """An echo server answering `method` with `response`, ready; checked to return it."""
        log_dir = self.work_dir / name
        log_dir.mkdir(parents=True, exist_ok=True)
        response_file = log_dir / "response.bin"
        response_file.write_bytes(response)
        echo = spawn_echo(log_dir, self.pinning.server, response_file, method)
        try:
            port = await echo.wait_ready()
            if await call_raw(port, None, method, b"") != response:
                raise RuntimeError(f"{name}: the echo server did not return the captured response")
        except BaseException:
            echo.stop()
            raise
        return echo

    async def h2load_phase(
        self, name: str, prefd_port: int, request_for: Callable[[int], notifications_pb2.DecideRequest], response: bytes
    ) -> dict[str, Any]:
        """Alternating echo/prefd h2load rounds of one Decide; rounds, medians, ratio, checks.

        prefd's h2load run k (the fixed-count check is 1, round r's timed run 1 + r) posts
        request_for(k); a consuming phase gives each run a user of its own, so no run's counter
        nears the event rule's limit, and checks how often each run charged.
        """
        consume = request_for(1).consume

        def body(k: int) -> Path:
            path = self.work_dir / f"{name}-{k}.grpc"
            path.write_bytes(grpc_frame(request_for(k).SerializeToString()))
            return path

        async def charged_by(k: int, run: Awaitable[dict[str, Any]]) -> tuple[dict[str, Any], int | None]:
            """Run h2load; with consume, also how often it charged run k's counter."""
            if not consume:
                return await run, None
            subject = request_for(k).subject
            before = await remaining(prefd_port, self.tokens.service, subject)
            result = await run
            charged = before - await remaining(prefd_port, self.tokens.service, subject)
            if charged > CHARGE_HEADROOM:
                raise RuntimeError(f"one h2load run charged {charged} times (> {CHARGE_HEADROOM}): lower --duration")
            return result, charged

        echo = await self.start_echo(f"echo-{name}", DECIDE, response)
        servers = {"echo": (echo.port, None), "prefd": (prefd_port, self.tokens.service)}
        charges: dict[str, Any] = {}
        try:
            exact = {}
            for server, (port, token) in servers.items():
                log(f"{name} {server}: checking h2load's request gets full gRPC answers")
                check = check_h2load_exact(self.params, port, body(1), token, len(response), DECIDE)
                if server == "echo":
                    exact[server] = await check
                    continue
                exact[server], charged = await charged_by(1, check)
                if charged is not None:
                    charges["fixed_count_run"] = {"requests": exact[server]["requests"], "charged": charged}
                    if charged != exact[server]["requests"]:
                        raise RuntimeError(f"h2load -n {exact[server]['requests']} charged {charged} times")
            runs: dict[str, list[dict[str, Any]]] = {server: [] for server in servers}
            for round_no in range(1, self.args.rounds + 1):
                for server, (port, token) in servers.items():
                    load_before = loadavg_1m()
                    timed = run_h2load(self.params, port, body(1 + round_no), token, len(response), DECIDE)
                    result, charged = (await timed, None) if server == "echo" else await charged_by(1 + round_no, timed)
                    entry = {
                        "round": round_no,
                        "req_per_s": result["req_per_s"],
                        "request_time_mean_us": result["request_time_mean_us"],
                        "loadavg_1m_before": load_before,
                        "h2load": result,
                    }
                    if charged is not None:
                        entry["charged"] = charged
                        if charged < result["succeeded"]:
                            raise RuntimeError(f"{result['succeeded']} calls succeeded but only {charged} charged")
                    runs[server].append(entry)
                    log(f"{name} round {round_no}/{self.args.rounds} {server}: {result['req_per_s']:.0f} req/s")
        finally:
            exit_code = echo.stop()
        medians = {server: throughput_medians(r) for server, r in runs.items()}
        correctness: dict[str, Any] = {
            "h2load_fixed_count_full_responses": exact,
            "h2load_timed_runs_data_covers_successes": all(
                r["h2load"]["data_covers_successes"] for rs in runs.values() for r in rs
            ),
        }
        if consume:
            correctness["charges"] = {
                **charges,
                "timed_runs_charged_at_least_successes": all(
                    r["charged"] >= r["h2load"]["succeeded"] for r in runs["prefd"]
                ),
                "counter_per_run": f"each prefd run charges a user of its own (bench-cNNN-{RUN_TAG})",
            }
        return {
            "request_bytes": request_for(1).ByteSize(),
            "response_bytes": len(response),
            "servers": {server: {"rounds": r, "median": medians[server]} for server, r in runs.items()},
            "req_per_s_prefd_over_echo": ratio(medians["prefd"]["req_per_s"], medians["echo"]["req_per_s"]),
            "correctness": correctness,
            "echo_exit_code": exit_code,
        }

    async def serial_batch(self, port: int, token: str | None, request: bytes, calls: int) -> list[int]:
        """`calls` sequential DecideBatch calls on one channel; each one's latency in ns."""
        samples = []
        async with grpc.aio.insecure_channel(f"{HOST}:{port}", options=UNLIMITED_MESSAGES) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(DECIDE_BATCH)
            metadata = auth_metadata(token)
            for _ in range(calls):
                start = time.perf_counter_ns()
                reply = await call(request, metadata=metadata, timeout=60)
                samples.append(time.perf_counter_ns() - start)
                if len(reply) < BATCH_SIZE:
                    raise RuntimeError("a DecideBatch call returned a short answer")
        return samples

    async def batch_phase(self, prefd_port: int) -> dict[str, Any]:
        """Sequential DecideBatch latency on prefd and on an echo replaying its answer, alternating."""
        request = batch_request().SerializeToString()
        token = self.tokens.service
        log(f"batch: warming prefd with {self.args.batch_warmup} DecideBatch calls")
        await self.serial_batch(prefd_port, token, request, self.args.batch_warmup)
        response = await call_raw(prefd_port, token, DECIDE_BATCH, request)
        reply = N.DecideBatchResponse.FromString(response)
        users = [d.subject.user_id for d in reply.decisions]
        if users != [f"bench-batch-{i:04d}" for i in range(BATCH_SIZE)]:
            raise RuntimeError("DecideBatch did not answer every recipient in order")
        outcomes = Counter(tuple(sorted(actions(d).items())) for d in reply.decisions)
        expected = (("EMAIL", "SEND_NOW"), ("IN_APP", "SEND_NOW"), ("PUSH", "SEND_NOW"))
        if outcomes != {expected: BATCH_SIZE}:
            raise RuntimeError(f"unexpected DecideBatch outcomes: {dict(outcomes)}")
        echo = await self.start_echo("echo-batch", DECIDE_BATCH, response)
        servers = {"echo": (echo.port, None), "prefd": (prefd_port, token)}
        samples: dict[str, list[int]] = {server: [] for server in servers}
        rounds: dict[str, list[dict[str, Any]]] = {server: [] for server in servers}
        per_round = max(1, -(-self.args.batch_calls // self.args.rounds))
        try:
            await self.serial_batch(echo.port, None, request, self.args.batch_warmup)
            for round_no in range(1, self.args.rounds + 1):
                for server, (port, server_token) in servers.items():
                    got = await self.serial_batch(port, server_token, request, per_round)
                    samples[server] += got
                    rounds[server].append({"round": round_no, **percentiles_ms(got)})
                    log(f"batch round {round_no}/{self.args.rounds} {server}: p50 {rounds[server][-1]['p50']} ms")
        finally:
            exit_code = echo.stop()
        pooled = {server: percentiles_ms(s) for server, s in samples.items()}
        return {
            "recipients": BATCH_SIZE,
            "request_bytes": len(request),
            "response_bytes": len(response),
            "warmup_calls_per_server": self.args.batch_warmup,
            "calls_per_round": per_round,
            "servers": {server: {"rounds": rounds[server], "pooled_ms": pooled[server]} for server in servers},
            "p50_ms": pooled["prefd"]["p50"],
            "p99_ms": pooled["prefd"]["p99"],
            "p50_prefd_over_echo": ratio(pooled["prefd"]["p50"], pooled["echo"]["p50"]),
            "outcomes": "SEND_NOW on EMAIL, PUSH and IN_APP for all 1,000",
            "echo_exit_code": exit_code,
        }

    async def exactness_phase(self, db: BenchDatabase, first_port: int) -> dict[str, Any]:
        """200 concurrent consuming Decides for one user over two prefd processes: SEND_NOW count."""
        second = await start_prefd(
            db, self.tokens, self.work_dir / "prefd-2", self.pinning.server, {"REDIS_URL": self.args.redis_url}
        )
        try:
            user_scope = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=EXACT_USER)
            await set_preferences(first_port, self.tokens.admin, user_scope, {"notifications.event_rules": EXACT_RULES})
            move = N.Event(event_type=EXACT_EVENT, category="trading", channels=[N.CHANNEL_IN_APP])
            subject = common_pb2.Subject(user_id=EXACT_USER)
            metadata = auth_metadata(self.tokens.service)
            channels = [grpc.aio.insecure_channel(f"{HOST}:{p}") for p in (first_port, second.port)]
            try:
                stubs = [notifications_pb2_grpc.NotificationServiceStub(c) for c in channels]
                peek = N.DecideRequest(subject=subject, event=move)
                async with asyncio.timeout(30):
                    while True:  # both processes must see the rule (the second through the feed)
                        replies = [await s.Decide(peek, metadata=metadata, timeout=30) for s in stubs]
                        if all(r.decision.throttle.limit == EXACT_LIMIT for r in replies):
                            break
                        await asyncio.sleep(0.05)

                async def one(i: int) -> tuple[str, str]:
                    request = N.DecideRequest(subject=subject, event=move, consume=True, idempotency_key=f"call-{i}")
                    reply = await stubs[i % 2].Decide(request, metadata=metadata, timeout=30)
                    return actions(reply.decision)["IN_APP"], reply.decision.throttle.store

                log(f"exactness: {EXACT_CALLS} concurrent consuming Decides over two processes")
                first = await asyncio.gather(*(one(i) for i in range(EXACT_CALLS)))
                retried = await asyncio.gather(*(one(i) for i in range(EXACT_CALLS)))
            finally:
                for c in channels:
                    await c.close()
        finally:
            second_exit = second.stop()
        counts = Counter(a for a, _ in first)
        stores = sorted({s for _, s in first})
        return {
            "calls": EXACT_CALLS,
            "processes": 2,
            "limit": EXACT_LIMIT,
            "send_now": counts.get("SEND_NOW", 0),
            "suppress": counts.get("SUPPRESS", 0),
            "other": sum(v for k, v in counts.items() if k not in ("SEND_NOW", "SUPPRESS")),
            "exact": counts.get("SEND_NOW", 0) == EXACT_LIMIT
            and counts.get("SUPPRESS", 0) == EXACT_CALLS - EXACT_LIMIT,
            "stores": stores,
            "retries_get_first_answers": [a for a, _ in retried] == [a for a, _ in first],
            "second_prefd_exit_code": second_exit,
        }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Set up, run the four phases, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    bench = Bench(args, work_dir, pinning, tokens)
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned
        prefd = await start_prefd(db, tokens, work_dir / "prefd", pinning.server, {"REDIS_URL": args.redis_url})
        try:
            log("writing the event rules and overrides")
            await seed(prefd.port, tokens.admin, args.rounds + 2)
            dry_bytes = await call_raw(prefd.port, tokens.service, DECIDE, DRY_REQUEST.SerializeToString())
            dry = N.DecideResponse.FromString(dry_bytes)
            expect_all_sent(dry.decision, "dry-run Decide")
            if dry.decision.throttle.limit:
                raise RuntimeError("the LARGE_LOSS decision is throttled")
            rule_layers = sorted(
                {
                    common_pb2.Layer.Name(step.provenance.layer)
                    for step in dry.decision.trace
                    if step.key == "notifications.event_rules"
                }
            )
            consume_bytes = await call_raw(prefd.port, tokens.service, DECIDE, consume_request(0).SerializeToString())
            consumed = N.DecideResponse.FromString(consume_bytes)
            expect_all_sent(consumed.decision, "consuming Decide")
            if consumed.decision.throttle.store != "redis":
                raise RuntimeError(f"throttle charged in {consumed.decision.throttle.store!r}, not Redis")

            log("phase 1: Decide consume=false vs echo")
            dry_run = await bench.h2load_phase("dry_run", prefd.port, lambda _: DRY_REQUEST, dry_bytes)
            log("phase 2: Decide consume=true (Redis throttle) vs echo")
            consume = await bench.h2load_phase("consume", prefd.port, consume_request, consume_bytes)
            log("phase 3: DecideBatch of 1,000")
            batch = await bench.batch_phase(prefd.port)
            log("phase 4: throttle exactness over two processes")
            exactness = await bench.exactness_phase(db, prefd.port)
        finally:
            prefd_exit = prefd.stop()

    summary = {
        "dry_run_req_per_s_prefd_over_echo": dry_run["req_per_s_prefd_over_echo"],
        "consume_req_per_s_prefd_over_echo": consume["req_per_s_prefd_over_echo"],
        "dry_run_prefd_req_per_s": dry_run["servers"]["prefd"]["median"]["req_per_s"],
        "consume_prefd_req_per_s": consume["servers"]["prefd"]["median"]["req_per_s"],
        "batch_1000_p50_ms": batch["p50_ms"],
        "batch_1000_p99_ms": batch["p99_ms"],
        "exactness_send_now": exactness["send_now"],
        "exactness_suppress": exactness["suppress"],
    }
    targets = {
        "dry_run_ratio_at_least_0.70": (summary["dry_run_req_per_s_prefd_over_echo"] or 0) >= 0.70,
        "consume_ratio_at_least_0.50": (summary["consume_req_per_s_prefd_over_echo"] or 0) >= 0.50,
        "batch_p50_at_most_50_ms": (batch["p50_ms"] or float("inf")) <= 50.0,
        "exactly_5_sent": exactness["exact"],
    }
    return {
        "benchmark": "NotificationService Decide and DecideBatch: prefd vs bare grpc.aio baselines",
        "baseline": "echo: bench/echo_server.py (plain grpc.aio.server(), generic handler, returns one "
        "prebuilt real prefd response for the method; no auth, no database, no Redis)",
        "machine": machine,
        "parameters": {
            "rounds": args.rounds,
            "order": "phases dry_run, consume, batch, exactness; per round: echo then prefd",
            "h2load": {
                **asdict(bench.params),
                "command": bench.params.argv("<port>", Path("<request.grpc>"), "<service token>", method=DECIDE),
            },
            "batch_calls": args.batch_calls,
            "batch_warmup": args.batch_warmup,
            "subject": {"user_id": SUBJECT.user_id, "org_id": SUBJECT.org_id},
            "global_event_rules": GLOBAL_RULES,
            "overrides": {"ORG": {"notifications.push.enabled": True}, "USER": {"notifications.in_app.enabled": True}},
            "event_rule_layers_in_trace": rule_layers,
            "redis_url": args.redis_url,
            "prefd_settings": "defaults plus REDIS_URL",
        },
        "pinning": {
            **pinning.describe(),
            "echo and the second prefd": sorted(pinning.server) if pinning.server else "not pinned",
            "h2load": sorted(pinning.client) if pinning.client else "not pinned",
            "redis": "not pinned",
        },
        "database": db.describe(),
        "summary": summary,
        "targets": TARGETS,
        "targets_met": targets,
        "dry_run": dry_run,
        "consume": consume,
        "batch": batch,
        "exactness": exactness,
        "prefd_exit_code": prefd_exit,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(description="prefd Decide and DecideBatch against bare grpc.aio baselines.")
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=3.0,
        help="h2load seconds per run (default 3: a consuming run, warm-up included, must stay under 9,000 charges)",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up seconds per run (default 1)")
    parser.add_argument("--clients", type=positive_int, default=50, help="h2load clients (-c, default 50)")
    parser.add_argument("--streams", type=positive_int, default=10, help="h2load streams per client (-m, default 10)")
    parser.add_argument("--threads", type=int, default=0, help="h2load threads (-t; default: one per load CPU)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds, at least 3 (default 3)")
    parser.add_argument(
        "--batch-calls", type=positive_int, default=45, help="measured DecideBatch calls per server (default 45)"
    )
    parser.add_argument("--batch-warmup", type=int, default=5, help="unmeasured DecideBatch calls first (default 5)")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="Redis for prefd (default: REDIS_URL; required)"
    )
    add_pin_option(parser, "pin servers to the first CPU and load generators to the rest (default on; needs >= 2 CPUs)")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("set REDIS_URL (or --redis-url): the throttles are charged in Redis")
    return args


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 without h2load, 130 when interrupted."""
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found (Debian: apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-decide-")


if __name__ == "__main__":
    raise SystemExit(main())
