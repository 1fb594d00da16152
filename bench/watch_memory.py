"""Benchmark: resident memory per idle WatchPreferences stream in prefd, against a bare grpc.aio floor.

What it measures
    The growth of the server process's resident set (VmRSS from /proc/<pid>/status; RssAnon is
    reported too) as idle watch streams are added. After start-up and a warm-up (--warmup streams
    opened, answered and closed again), streams are opened in steps (--steps, default
    0,500,1000,2000 streams open in total). At each step, once every stream has received its
    ``started`` message and --settle seconds (default 2) have passed, RSS is sampled five times
    (0.2 s apart) and the median kept. A least-squares line through (streams, RSS) gives bytes
    per stream (with R²); the per-step increments are reported too.

    prefd streams are subject watches for (u<i>, o1), one user each, with a service token; they
    stay idle (no writes) apart from prefd's bookmarks (every 5 s by default).

Baseline
    bench/idle_watch_server.py: a plain grpc.aio server serving the same method path, answering
    each call with one prebuilt ``started`` message and then idling (no auth, no database, no
    feed). Its bytes per stream is what grpc.aio costs by itself; prefd minus that is what prefd
    adds. Both are measured in the same run, alternating (baseline then prefd, prefd then baseline,
    ...) for --rounds rounds (default 3, at least 3), each run a fresh server process. The report
    gives every run, the medians per server, and the difference and ratio of the median slopes.

Reference
    etcd: ~18 KB per watch stream. This is a peer figure quoted for comparison only; it was not
    measured here (etcd is a Go server with its own watch implementation).

Setup and output as in bench/effective_read.py: a fresh database for prefd (on DATABASE_URL's
server, else an embedded PostgreSQL), servers as child processes (pinned to the first CPU, this
client to the others, unless --no-pin), one JSON document on stdout, progress on stderr. The
client keeps every stream open over --channels connections (default 4).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/watch_memory.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, spawn_idle_watch, spawn_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.procstats import read_rss_bytes
from harness.progress import log
from harness.stats import linear_fit, ratio
from harness.streams import StreamSet

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc

ORG = "o1"
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
OPEN_TIMEOUT_S = 120.0
RSS_SAMPLES = 5
RSS_SAMPLE_GAP_S = 0.2
ETCD_REFERENCE_BYTES = 18_000
SERVERS = ("baseline", "prefd")


class IdleStreams(StreamSet):
    """Watch streams kept open and read (started, bookmarks) until closed."""

    def __init__(self, channels: list[grpc.aio.Channel], token: str | None) -> None:
        super().__init__()
        self._stubs = [preferences_pb2_grpc.PreferencesServiceStub(channel) for channel in channels]
        self._metadata = auth_metadata(token) if token else ()
        self.started = 0
        self.other_messages = 0
        self.errors: list[str] = []

    @property
    def open_count(self) -> int:
        return len(self._calls)

    async def grow_to(self, total: int, timeout_s: float = OPEN_TIMEOUT_S) -> float:
        """Open streams until `total` are open and all have `started`; the seconds it took."""
        began = time.monotonic()
        while len(self._calls) < total:
            index = len(self._calls)
            subject = common_pb2.Subject(user_id=f"u{index}", org_id=ORG)
            request = preferences_pb2.WatchPreferencesRequest(subject=subject)
            call = self._stubs[index % len(self._stubs)].WatchPreferences(request, metadata=self._metadata)
            self._calls.append(call)
            self._tasks.append(asyncio.create_task(self._read(index, call)))
            if index % 100 == 99:
                await asyncio.sleep(0)
        while self.started < total:
            if self.errors:
                raise RuntimeError(f"{len(self.errors)} watch streams failed: {self.errors[:3]}")
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"only {self.started}/{total} streams started after {timeout_s:.0f} s")
            await asyncio.sleep(0.01)
        return time.monotonic() - began

    async def _read(self, index: int, call: Any) -> None:
        try:
            async for response in call:
                if response.WhichOneof("message") == "started":
                    self.started += 1
                else:
                    self.other_messages += 1
            if not self._closing:
                self.errors.append(f"stream {index} ended")
        except grpc.aio.AioRpcError as exc:
            if not self._closing:
                self.errors.append(f"stream {index}: {exc.code().name} {exc.details()}")


async def sample_rss(pid: int) -> dict[str, int]:
    """Median VmRSS and RssAnon over a few samples."""
    samples = []
    for i in range(RSS_SAMPLES):
        if i:
            await asyncio.sleep(RSS_SAMPLE_GAP_S)
        samples.append(read_rss_bytes(pid))
    return {name: int(statistics.median(s[name] for s in samples)) for name in ("VmRSS", "RssAnon")}


@dataclass(frozen=True)
class Target:
    """A running server to open streams against."""

    name: str
    server: ChildServer
    token: str | None


async def measure(target: Target, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    """Warm up, then walk the steps; the run's RSS points, increments and fit."""
    proc = target.server.proc
    assert proc is not None
    address = f"{HOST}:{target.server.port}"
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(args.channels)]
    try:
        if args.warmup:
            warm = IdleStreams(channels, target.token)
            await warm.grow_to(args.warmup)
            await warm.close()
            await asyncio.sleep(args.settle)
        streams = IdleStreams(channels, target.token)
        points = []
        try:
            for step in args.steps:
                open_s = await streams.grow_to(step)
                await asyncio.sleep(args.settle)
                if proc.poll() is not None:
                    raise RuntimeError(f"{target.name} exited with {proc.returncode}")
                rss = await sample_rss(proc.pid)
                points.append(
                    {
                        "streams": step,
                        "open_s": round(open_s, 2),
                        "vmrss_bytes": rss["VmRSS"],
                        "rssanon_bytes": rss["RssAnon"],
                    }
                )
                log(f"round {round_no} {target.name}: {step} streams, VmRSS {rss['VmRSS'] / 2**20:.1f} MiB")
            stream_errors = len(streams.errors)
        finally:
            await streams.close()
    finally:
        for channel in channels:
            await channel.close()
    fit = linear_fit([p["streams"] for p in points], [p["vmrss_bytes"] for p in points])
    anon_fit = linear_fit([p["streams"] for p in points], [p["rssanon_bytes"] for p in points])
    increments = [
        {
            "from": a["streams"],
            "to": b["streams"],
            "bytes_per_stream": round((b["vmrss_bytes"] - a["vmrss_bytes"]) / (b["streams"] - a["streams"])),
        }
        for a, b in itertools.pairwise(points)
    ]
    return {
        "round": round_no,
        "server": target.name,
        "points": points,
        "step_increments": increments,
        "vmrss_bytes_per_stream": round(fit["slope"]),
        "vmrss_fit_r2": round(fit["r2"], 4),
        "vmrss_at_zero_streams_fit_bytes": round(fit["intercept"]),
        "rssanon_bytes_per_stream": round(anon_fit["slope"]),
        "stream_errors": stream_errors,
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Set up, run the alternating rounds, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    runs: list[dict[str, Any]] = []
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned
        for round_no in range(1, args.rounds + 1):
            order = SERVERS if round_no % 2 else tuple(reversed(SERVERS))
            for name in order:
                log_dir = work_dir / f"round{round_no}-{name}"
                log(f"round {round_no}/{args.rounds} {name}: steps {args.steps}")
                load_before = loadavg_1m()
                if name == "prefd":
                    server = spawn_prefd(db, tokens, log_dir, pinning.server)
                    token: str | None = tokens.service
                else:
                    server = spawn_idle_watch(log_dir, pinning.server)
                    token = None
                try:
                    await server.wait_ready()
                    runs.append(await measure(Target(name, server, token), args, round_no))
                finally:
                    exit_code = server.stop()
                runs[-1].update(exit_code=exit_code, loadavg_1m_before=load_before)
                log(f"round {round_no} {name}: {runs[-1]['vmrss_bytes_per_stream']} bytes/stream")

    medians = {
        name: {
            metric: round(statistics.median(r[metric] for r in runs if r["server"] == name))
            for metric in ("vmrss_bytes_per_stream", "rssanon_bytes_per_stream")
        }
        for name in SERVERS
    }
    prefd_slope = medians["prefd"]["vmrss_bytes_per_stream"]
    base_slope = medians["baseline"]["vmrss_bytes_per_stream"]
    return {
        "benchmark": "Resident memory per idle WatchPreferences stream: prefd vs a bare grpc.aio server",
        "method": "/prefd.v1.PreferencesService/WatchPreferences",
        "baseline": "bench/idle_watch_server.py: plain grpc.aio server, generic handler, one prebuilt `started` "
        "message then idle; no auth, no database, no feed",
        "measurement": f"server VmRSS (/proc/<pid>/status), median of {RSS_SAMPLES} samples {RSS_SAMPLE_GAP_S} s "
        f"apart, {args.settle:g} s after every stream of a step got `started`; bytes per stream = "
        "least-squares slope over the steps",
        "load_generator_note": "the client holding the streams (one Python process) runs on the same machine; "
        "only the server process's memory is measured",
        "machine": machine,
        "parameters": {
            "steps": args.steps,
            "warmup_streams": args.warmup,
            "settle_s": args.settle,
            "channels": args.channels,
            "rounds": args.rounds,
            "order": "baseline first in odd rounds, prefd first in even rounds; a fresh server process per run",
            "prefd_watch": f"subject watches (u<i>, {ORG}), one user each, service token, no writes",
            "prefd_settings": "defaults (bookmarks every 5 s, queue capacity 10,000, no Redis)",
        },
        "pinning": pinning.describe(server_name="servers"),
        "database": db.describe(),
        "runs": runs,
        "median": medians,
        "prefd_minus_baseline_bytes_per_stream": prefd_slope - base_slope,
        "ratio_prefd_over_baseline": ratio(prefd_slope, base_slope),
        "prefd_kib_per_stream": round(prefd_slope / 1024, 2),
        "reference": {
            "etcd_bytes_per_watch_stream": ETCD_REFERENCE_BYTES,
            "note": "peer figure (~18 KB per stream, taken as 18,000 bytes) quoted for comparison only; "
            "NOT measured in this run",
            "ratio_prefd_over_etcd_reference": ratio(prefd_slope, ETCD_REFERENCE_BYTES),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""

    def steps(text: str) -> list[int]:
        values = [int(v) for v in text.split(",")]
        if len(set(values)) < 2 or any(v < 0 for v in values) or values != sorted(values):
            raise argparse.ArgumentTypeError("ascending, non-negative stream counts, at least two distinct")
        return values

    parser = argparse.ArgumentParser(description="Resident memory per idle prefd watch stream vs bare grpc.aio.")
    parser.add_argument(
        "--steps", type=steps, default=[0, 500, 1000, 2000], help="open streams per step (default 0,500,1000,2000)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="streams opened and closed first (default 50)")
    parser.add_argument("--settle", type=positive_float, default=2.0, help="seconds before sampling (default 2)")
    parser.add_argument("--channels", type=positive_int, default=4, help="client connections (default 4)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds, at least 3 (default 3)")
    add_pin_option(parser, "pin the servers to the first CPU and this client to the rest (default on; needs >= 2 CPUs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-memory-")


if __name__ == "__main__":
    raise SystemExit(main())
