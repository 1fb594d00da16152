"""One unary read measured on prefd and on bench/echo_server.py replaying prefd's captured answer.

A benchmark describes its read as a ReadTarget (method, request, seed writes, response checks) and
calls main(target). Per round, echo then prefd: serial latency from a grpc.aio client, then an h2load
run; correctness is checked first (one real call each, one fixed-count h2load run per server). The
report gives every round, the medians and the prefd/echo ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, spawn_echo, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import fresh_database
from harness.entry import run_main
from harness.h2load import H2loadParams, check_h2load_exact, grpc_frame, run_h2load
from harness.machine import machine_info
from harness.progress import log
from harness.stats import percentile
from prefd.v1 import common_pb2

SUBJECT = common_pb2.Subject(user_id="bench-user", org_id="bench-org")


@dataclass(frozen=True)
class ReadTarget:
    """The unary read a run measures against the echo baseline, and how to judge its answers."""

    benchmark: str  # the report's title
    description: str  # the command line's description
    method: str  # the full gRPC method path, served by prefd and (via --method) by the echo server
    request: Message  # the one request every call sends
    response_type: type[Message]
    seed: Callable[[int, str], Awaitable[None]]  # (prefd port, admin token): write what the read must see
    check: Callable[[Any], dict[str, Any]]  # raises unless a response is the expected one; else facts to report
    payload: Callable[[Any], dict[str, Any]]  # response facts for the report's "payload" section
    answered: Callable[[Any], bool]  # cheap check of every serial call's response
    empty_answer: str  # what a serial response failing `answered` is called in the error


async def get_raw(port: int, token: str | None, target: ReadTarget) -> bytes:
    """One real call of the target's read; the response exactly as sent."""
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        # No serializers: bytes in, bytes out, so the wire payload can be compared and replayed.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(target.method)
        response: bytes = await call(target.request.SerializeToString(), metadata=auth_metadata(token), timeout=30)
        return response


async def serial_latency(port: int, token: str | None, calls: int, warmup: int, target: ReadTarget) -> dict[str, float]:
    """`warmup` then `calls` sequential unary calls on one channel; latency percentiles in µs."""
    request = target.request
    metadata = auth_metadata(token)
    samples: list[int] = []
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        # What a generated stub's method is: the path plus the message's (de)serializers.
        call = channel.unary_unary(
            target.method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=target.response_type.FromString,
        )
        for _ in range(warmup):
            await call(request, metadata=metadata, timeout=30)
        for _ in range(calls):
            start = time.perf_counter_ns()
            response = await call(request, metadata=metadata, timeout=30)
            samples.append(time.perf_counter_ns() - start)
            if not target.answered(response):
                raise RuntimeError(f"a serial call returned {target.empty_answer}")
    samples.sort()
    return {
        "p50_us": round(percentile(samples, 50) / 1000, 1),
        "p90_us": round(percentile(samples, 90) / 1000, 1),
        "p99_us": round(percentile(samples, 99) / 1000, 1),
        "mean_us": round(statistics.fmean(samples) / 1000, 1),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Per-metric medians over the rounds of one server."""
    return {
        key: round(float(statistics.median(float(r[key]) for r in rounds)), 1)
        for key in ("req_per_s", "p50_us", "p90_us", "p99_us", "mean_us", "h2load_request_time_mean_us")
    }


async def run(args: argparse.Namespace, work_dir: Path, target: ReadTarget) -> dict[str, Any]:
    """Set up, measure every round of the target's read, tear down; the JSON report."""
    machine = machine_info()
    all_cpus = os.sched_getaffinity(0)
    pin = args.pin and len(all_cpus) >= 2
    server_cpus = {min(all_cpus)} if pin else None
    client_cpus = all_cpus - {min(all_cpus)} if pin else None
    params = H2loadParams(
        duration_s=args.duration,
        warmup_s=args.warmup,
        clients=args.clients,
        streams=args.streams,
        threads=args.threads or min(len(client_cpus or all_cpus), args.clients),
    )
    tokens = Tokens.new()

    async with fresh_database() as db:
        if client_cpus is not None:
            # After the (possibly embedded) database started, so it stays unpinned; h2load inherits this.
            os.sched_setaffinity(0, client_cpus)
        prefd = await start_prefd(db, tokens, work_dir, server_cpus)
        echo: ChildServer | None = None
        try:
            log("writing what the read must see")
            await target.seed(prefd.port, tokens.admin)
            response_bytes = await get_raw(prefd.port, tokens.service, target)
            captured = target.response_type.FromString(response_bytes)
            prefd_check = target.check(captured)
            payload = target.payload(captured)
            response_file = work_dir / "response.bin"
            response_file.write_bytes(response_bytes)
            log(f"prefd returned {payload} ({len(response_bytes)} bytes); starting echo")

            echo = spawn_echo(work_dir, server_cpus, response_file, target.method)
            echo_port = await echo.wait_ready()
            if await get_raw(echo_port, None, target) != response_bytes:
                raise RuntimeError("the echo server did not return the captured response")

            request = target.request
            body = work_dir / "request.grpc"
            body.write_bytes(grpc_frame(request.SerializeToString()))

            servers: dict[str, tuple[int, str | None]] = {
                "echo": (echo_port, None),
                "prefd": (prefd.port, tokens.service),
            }
            exact_checks = {}
            for name, (port, token) in servers.items():
                log(f"{name}: checking h2load's request gets full gRPC answers")
                exact_checks[name] = await check_h2load_exact(
                    params, port, body, token, len(response_bytes), target.method
                )
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for round_no in range(1, args.rounds + 1):
                for name, (port, token) in servers.items():
                    log(f"round {round_no}/{args.rounds} {name}: {args.serial} serial calls")
                    latency = await serial_latency(port, token, args.serial, args.serial_warmup, target)
                    log(f"round {round_no}/{args.rounds} {name}: h2load {params.duration_s:g} s")
                    load = await run_h2load(params, port, body, token, len(response_bytes), target.method)
                    runs[name].append(
                        {
                            "round": round_no,
                            **latency,
                            "req_per_s": load["req_per_s"],
                            "h2load_request_time_mean_us": load["request_time_mean_us"],
                            "h2load": load,
                        }
                    )
                    log(
                        f"round {round_no}/{args.rounds} {name}: p50 {latency['p50_us']:.0f} us, "
                        f"{load['req_per_s']:.0f} req/s"
                    )
        finally:
            exit_codes = {"echo": echo.stop() if echo else None, "prefd": prefd.stop()}

    medians = {name: summarize(rounds) for name, rounds in runs.items()}
    return {
        "benchmark": target.benchmark,
        "method": target.method,
        "baseline": "echo: bench/echo_server.py (plain grpc.aio.server(), generic handler, "
        "returns one prebuilt real prefd response; no auth, no database)",
        "machine": machine,
        "parameters": {
            "rounds": args.rounds,
            "order": "per round: echo then prefd; each: serial latency, then h2load",
            "serial_calls": args.serial,
            "serial_warmup_calls": args.serial_warmup,
            "h2load": {
                **asdict(params),
                "command": params.argv("<port>", body, "<service token>", method=target.method),
            },
        },
        "pinning": {
            "enabled": pin,
            "prefd": sorted(server_cpus) if server_cpus else "not pinned",
            "echo": sorted(server_cpus) if server_cpus else "not pinned",
            "load_generators (python client, h2load)": sorted(client_cpus) if client_cpus else "not pinned",
            "postgresql": "not pinned",
        },
        "database": db.describe(),
        "payload": {
            "request_bytes": request.ByteSize(),
            "response_bytes": len(response_bytes),
            **payload,
        },
        "correctness": {
            "prefd_grpc_call": prefd_check,
            "echo_returns_captured_response": True,
            "h2load_fixed_count_full_responses": exact_checks,
            "h2load_timed_runs_data_covers_successes": all(
                r["h2load"]["data_covers_successes"] for rounds in runs.values() for r in rounds
            ),
        },
        "servers": {name: {"rounds": rounds, "median": medians[name]} for name, rounds in runs.items()},
        "ratios": {
            "req_per_s_prefd_over_echo": round(medians["prefd"]["req_per_s"] / medians["echo"]["req_per_s"], 3),
            "p50_latency_prefd_over_echo": round(medians["prefd"]["p50_us"] / medians["echo"]["p50_us"], 3),
        },
        "server_exit_codes": exit_codes,
    }


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--duration", type=positive_float, default=10.0, help="h2load seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up seconds per run (default 1)")
    parser.add_argument("--clients", type=positive_int, default=50, help="h2load clients (-c, default 50)")
    parser.add_argument("--streams", type=positive_int, default=10, help="h2load streams per client (-m, default 10)")
    parser.add_argument("--threads", type=int, default=0, help="h2load threads (-t; default: one per load CPU)")
    parser.add_argument("--serial", type=positive_int, default=500, help="sequential calls per round (default 500)")
    parser.add_argument("--serial-warmup", type=int, default=50, help="unmeasured calls first (default 50)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds, at least 3 (default 3)")
    add_pin_option(parser, "pin servers to the first CPU and load generators to the rest (default on; needs >= 2 CPUs)")
    return parser.parse_args(argv)


def main(target: ReadTarget, argv: list[str] | None = None) -> int:
    """Run the benchmark for `target`; 0 on success, 2 without h2load, 130 when interrupted."""
    args = parse_args(argv, target.description)
    if shutil.which("h2load") is None:
        print("h2load not found (Debian: apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    return run_main(lambda work_dir: run(args, work_dir, target), "prefd-bench-")
