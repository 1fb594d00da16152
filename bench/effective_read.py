"""Benchmark: prefd's GetEffectivePreferences against a bare grpc.aio baseline.

What it measures
    The cost prefd adds on top of grpc.aio for its main read,
    ``/prefd.v1.PreferencesService/GetEffectivePreferences`` for one subject (about 86 resolved
    keys with provenance), compared with bench/echo_server.py, which serves the same method path
    with a fixed, prebuilt copy of a real prefd response: no auth, no database, no protobuf work.

    * serial latency: N sequential unary calls from a Python grpc.aio client (after a warm-up);
      p50/p90/p99 in microseconds.
    * throughput: h2load (-D seconds, -c clients, -m streams per client) posting a gRPC-framed
      request. h2load only sees HTTP status (gRPC errors are HTTP 200 too), so correctness is
      checked separately: one real gRPC call to each server must return the expected values; one
      fixed-count h2load run (-n clients*streams) per server must receive exactly one full response
      message per request; and every timed run must have received at least that many bytes.

    Both measurements run for echo then prefd, alternating, for --rounds rounds (at least 3);
    the report gives every round, the medians, and the prefd/echo ratios of median req/s and of
    median p50 latency.

Setup
    With DATABASE_URL set, a fresh database ``prefd_bench_<random>`` is created on that server and
    dropped at the end. Without it prefd runs its embedded PostgreSQL in a temporary
    PREFD_DATA_DIR. prefd and the echo server run as child processes. On a machine with at least
    two CPUs both servers are pinned to the first CPU and the load generators (this process and
    h2load) to the others; PostgreSQL is left unpinned (--no-pin disables all pinning). Before
    measuring, an admin token writes an ORG and a USER override for the benchmark subject.

Reuse
    The read is a ReadTarget (method, request, seed writes, response checks); bench/ai_effective_read.py
    runs this same harness for GetEffectiveAIConfig by passing its own to main().

Output
    One JSON document on stdout; progress on stderr. Child logs go to a temporary directory,
    removed at the end (kept, and named on stderr, when the run fails).

Run it (from the repository root; the venv has grpcio, asyncpg and prefd installed):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/effective_read.py --duration 10 --clients 50 --streams 10 --serial 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from google.protobuf.message import Message

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from server.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
METHOD = "/prefd.v1.PreferencesService/GetEffectivePreferences"
HOST = "127.0.0.1"
SUBJECT = common_pb2.Subject(user_id="bench-user", org_id="bench-org")
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
TOKEN_TTL_S = 12 * 3600

_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr (stdout is reserved for the JSON report)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def spawn_affinity(cpus: set[int] | None) -> Iterator[None]:
    """Children forked inside this block inherit `cpus` (the forking thread's affinity)."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc), parents first."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return found


@dataclass
class ChildServer:
    """A server child process that prints `<name> serving on port N` once ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    cpus: set[int] | None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self.name}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.stderr"

    def start(self) -> None:
        """Spawn the process (own session, output to files so no pipe can ever block it)."""
        with (
            self.stdout_path.open("wb") as out,
            self.stderr_path.open("wb") as err,
            spawn_affinity(self.cpus),
        ):
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        log(f"started {self.name} (pid {self.proc.pid}, cpus {sorted(self.cpus) if self.cpus else 'any'})")

    async def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> int:
        """Wait for the port line on stdout; raise with the child's stderr tail if it exits first."""
        assert self.proc is not None
        pattern = re.compile(rf"^{re.escape(self.name)} serving on port (\d+)$", re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if match := pattern.search(self.stdout_path.read_text(errors="replace")):
                self.port = int(match.group(1))
                log(f"{self.name} serving on port {self.port}")
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout_s:.0f} s; killing pid {self.proc.pid}")
                self.proc.kill()
                self.proc.wait()
        log(f"{self.name} stopped (exit code {self.proc.returncode})")
        return self.proc.returncode


# --------------------------------------------------------------------------- database


@dataclass
class Database:
    """Where prefd keeps its data for this run: the env it needs and how to describe it."""

    mode: str
    env: dict[str, str]
    name: str
    embedded_pgdata: Path | None = None

    def unpin_embedded(self, cpus: set[int]) -> None:
        """Give the embedded PostgreSQL (started by, and so pinned like, prefd) every CPU again."""
        if self.embedded_pgdata is None:
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((self.embedded_pgdata / "postmaster.pid").read_text().split()[0])
            for pid in process_tree(postmaster):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)


def with_database(url: str, name: str) -> str:
    """`url` (a postgresql:// URL) pointing at database `name` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + name))


def stop_embedded_postgres(pgdata: Path) -> None:
    """Stop a PostgreSQL left running in `pgdata` (only if prefd could not stop it itself)."""
    if not (pgdata / "postmaster.pid").exists():
        return
    from pgserver._commands import POSTGRES_BIN_PATH  # the binaries of prefd's embedded server

    log(f"embedded PostgreSQL still running in {pgdata}; stopping it")
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "immediate", "-w"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def bench_database() -> AsyncIterator[Database]:
    """A fresh database on DATABASE_URL's server (dropped at the end), else an embedded one."""
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        # Its own temporary directory: removed even when a failed run keeps work_dir's logs.
        data_dir = Path(tempfile.mkdtemp(prefix="prefd-bench-data-"))
        db = Database("embedded", {"PREFD_DATA_DIR": str(data_dir)}, str(data_dir), data_dir / "pg")
        try:
            yield db
        finally:
            stop_embedded_postgres(data_dir / "pg")
            shutil.rmtree(data_dir, ignore_errors=True)
            log(f"removed embedded database {data_dir}")
        return

    name = f"prefd_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        log(f"created database {name}")
        try:
            yield Database("external", {"DATABASE_URL": with_database(server_url, name)}, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            log(f"dropped database {name}")
    finally:
        await admin.close()


# --------------------------------------------------------------------------- gRPC calls


@dataclass(frozen=True)
class ReadTarget:
    """The unary read a run measures against the echo baseline, and how to judge its answers.

    PREFERENCES (below) is this script's; bench/ai_effective_read.py passes its own to main().
    """

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


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata prefd needs (none for the echo server)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def seed_overrides(port: int, admin_token: str) -> None:
    """Write an ORG and a USER override for the benchmark subject, so resolution crosses layers."""
    writes = [
        (
            common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=SUBJECT.org_id),
            preferences_pb2.PreferenceWrite(key="display.theme", value=common_pb2.TypedValue(string_value="dark")),
        ),
        (
            common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=SUBJECT.user_id),
            preferences_pb2.PreferenceWrite(key="display.items_per_page", value=common_pb2.TypedValue(int_value=50)),
        ),
    ]
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        for scope, write in writes:
            request = preferences_pb2.SetPreferencesRequest(scope=scope, writes=[write], reason="benchmark setup")
            await stub.SetPreferences(request, metadata=auth_metadata(admin_token), timeout=30)


async def get_effective_raw(port: int, token: str | None, target: ReadTarget | None = None) -> bytes:
    """One real call of the target's read (default: GetEffectivePreferences); the response exactly as sent."""
    target = target or PREFERENCES
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        # No serializers: bytes in, bytes out, so the wire payload can be compared and replayed.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(target.method)
        response: bytes = await call(target.request.SerializeToString(), metadata=auth_metadata(token), timeout=30)
        return response


def check_prefd_response(response: preferences_pb2.GetEffectivePreferencesResponse) -> dict[str, Any]:
    """Fail unless the response holds values and both seeded overrides, from the right layers."""
    by_key = {value.key: value for value in response.values}
    theme = by_key.get("display.theme")
    per_page = by_key.get("display.items_per_page")
    problems = []
    if not response.values:
        problems.append("no values")
    if theme is None or theme.value.string_value != "dark" or theme.provenance.layer != common_pb2.LAYER_ORG:
        problems.append(f"display.theme is not 'dark' from the ORG layer: {theme}")
    if per_page is None or per_page.value.int_value != 50 or per_page.provenance.layer != common_pb2.LAYER_USER:
        problems.append(f"display.items_per_page is not 50 from the USER layer: {per_page}")
    if problems:
        raise RuntimeError("prefd returned an unexpected GetEffectivePreferences response: " + "; ".join(problems))
    return {
        "values": len(response.values),
        "display.theme": "dark (LAYER_ORG)",
        "display.items_per_page": "50 (LAYER_USER)",
    }


PREFERENCES = ReadTarget(
    benchmark="GetEffectivePreferences: prefd vs a bare grpc.aio baseline",
    description="Benchmark prefd GetEffectivePreferences against a bare grpc.aio echo server.",
    method=METHOD,
    request=preferences_pb2.GetEffectivePreferencesRequest(subject=SUBJECT),
    response_type=preferences_pb2.GetEffectivePreferencesResponse,
    seed=seed_overrides,
    check=check_prefd_response,
    payload=lambda response: {"response_values": len(response.values)},
    answered=lambda response: bool(response.values),
    empty_answer="no values",
)


def percentile_us(sorted_ns: list[int], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of nanosecond samples, in microseconds."""
    if len(sorted_ns) == 1:
        return sorted_ns[0] / 1000
    rank = (len(sorted_ns) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_ns) - 1)
    return (sorted_ns[low] + (sorted_ns[high] - sorted_ns[low]) * (rank - low)) / 1000


async def serial_latency(
    port: int, token: str | None, calls: int, warmup: int, target: ReadTarget | None = None
) -> dict[str, float]:
    """`warmup` then `calls` sequential unary calls on one channel; latency percentiles in µs."""
    target = target or PREFERENCES
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
        "p50_us": round(percentile_us(samples, 50), 1),
        "p90_us": round(percentile_us(samples, 90), 1),
        "p99_us": round(percentile_us(samples, 99), 1),
        "mean_us": round(statistics.fmean(samples) / 1000, 1),
    }


# --------------------------------------------------------------------------- h2load


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: compression flag 0, 4-byte big-endian length, payload."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


_DURATION = re.compile(r"^([\d.]+)(us|ms|s)$")


def duration_us(text: str) -> float:
    """h2load's '123us' / '4.56ms' / '1.2s' in microseconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"unexpected h2load duration {text!r}")
    return float(match.group(1)) * {"us": 1.0, "ms": 1e3, "s": 1e6}[match.group(2)]


def parse_h2load(output: str) -> dict[str, Any]:
    """The numbers we need from h2load's summary."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise RuntimeError(f"h2load output lacks /{pattern}/:\n{output}")
        return match

    finished = find(r"^finished in ([\d.]+\w+), ([\d.]+) req/s")
    requests = find(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout"
    )
    status = find(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    traffic = find(r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data")
    timing = find(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
    succeeded = int(requests.group(4))
    return {
        "req_per_s": float(finished.group(2)),
        "finished_in": finished.group(1),
        "requests": int(requests.group(1)),
        "succeeded": succeeded,
        "failed": int(requests.group(5)),
        "errored": int(requests.group(6)),
        "timeout": int(requests.group(7)),
        "status_2xx": int(status.group(1)),
        "status_non_2xx": sum(int(status.group(i)) for i in (2, 3, 4)),
        "data_bytes": int(traffic.group(3)),
        "data_bytes_per_success": round(int(traffic.group(3)) / succeeded, 1) if succeeded else 0.0,
        "request_time_mean_us": round(duration_us(timing.group(3)), 1),
        "request_time_max_us": round(duration_us(timing.group(2)), 1),
    }


def h2load_duration(seconds: float) -> str:
    """A DURATION for h2load, which takes whole numbers only: '10' (seconds) or '1500ms'."""
    return f"{seconds:g}" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


@dataclass(frozen=True)
class H2loadParams:
    """Identical h2load settings for both servers."""

    duration_s: float
    warmup_s: float
    clients: int
    streams: int
    threads: int

    def argv(
        self, port: int | str, body: Path, token: str | None, requests: int | None = None, method: str = METHOD
    ) -> list[str]:
        """The h2load command posting to `method`: timed (-D, --warm-up-time), or exactly `requests` (-n)."""
        headers = ["content-type: application/grpc", "te: trailers"]
        if token:
            headers.append(f"authorization: Bearer {token}")
        amount = (
            [f"--requests={requests}"]
            if requests is not None
            else [f"--duration={h2load_duration(self.duration_s)}", f"--warm-up-time={h2load_duration(self.warmup_s)}"]
        )
        return [
            "h2load",
            *amount,
            f"--clients={self.clients if requests is None else min(self.clients, requests)}",
            f"--max-concurrent-streams={self.streams}",
            f"--threads={self.threads}",
            f"--data={body}",
            *(arg for header in headers for arg in ("-H", header)),
            f"http://{HOST}:{port}{method}",
        ]


async def exec_h2load(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run h2load; its parsed summary. Fails on a non-zero exit, failed or non-2xx requests."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited with {proc.returncode}:\n{text}")
    result = parse_h2load(text)
    if result["succeeded"] == 0 or result["failed"] or result["errored"] or result["status_non_2xx"]:
        raise RuntimeError(f"h2load saw failures:\n{text}")
    return result


async def check_h2load_exact(
    params: H2loadParams, port: int, body: Path, token: str | None, message_bytes: int, method: str = METHOD
) -> dict[str, Any]:
    """h2load's exact request (headers, body) gets a full gRPC answer every time, under full concurrency.

    h2load counts HTTP status only, and a gRPC error is HTTP 200 too. With a fixed request count
    (-n) every response is complete, so the DATA bytes received must be exactly one framed
    response message (5 + message_bytes) per request; any gRPC error would fall short.
    """
    requests = params.clients * params.streams
    result = await exec_h2load(params.argv(port, body, token, requests=requests, method=method), timeout_s=120)
    expected = requests * (message_bytes + 5)
    if result["succeeded"] != requests or result["data_bytes"] != expected:
        raise RuntimeError(
            f"h2load -n {requests}: {result['succeeded']} succeeded with {result['data_bytes']} DATA bytes; "
            f"expected {requests} full responses = {expected} bytes (some calls answered with a gRPC error?)"
        )
    return {"requests": requests, "succeeded": result["succeeded"], "data_bytes": result["data_bytes"], "exact": True}


async def run_h2load(
    params: H2loadParams, port: int, body: Path, token: str | None, message_bytes: int, method: str = METHOD
) -> dict[str, Any]:
    """One timed h2load run (-D with warm-up); also fails when far fewer bytes came back than answers."""
    timeout_s = params.duration_s + params.warmup_s + 60
    result = await exec_h2load(params.argv(port, body, token, method=method), timeout_s=timeout_s)
    # Timed runs count DATA bytes from the warm-up and from unfinished streams too, so this is only
    # a lower bound (it catches a server answering errors throughout); check_h2load_exact is exact.
    result["data_covers_successes"] = result["data_bytes"] >= result["succeeded"] * (message_bytes + 5)
    if not result["data_covers_successes"]:
        raise RuntimeError(
            f"h2load received {result['data_bytes_per_success']} DATA bytes per succeeded request, "
            f"expected >= {message_bytes + 5} (the server probably answered with gRPC errors)"
        )
    return result


# --------------------------------------------------------------------------- report


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    """The median of one metric over the rounds."""
    return round(float(statistics.median(float(r[key]) for r in rounds)), 1)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Per-metric medians over the rounds of one server."""
    return {
        key: median_of(rounds, key)
        for key in ("req_per_s", "p50_us", "p90_us", "p99_us", "mean_us", "h2load_request_time_mean_us")
    }


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    h2load_version = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False).stdout
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "h2load": h2load_version.strip(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- main flow


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without prefd's own settings, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFD_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(extra)
    return env


async def run(args: argparse.Namespace, work_dir: Path, target: ReadTarget | None = None) -> dict[str, Any]:
    """Set up, measure every round of the target's read (default PREFERENCES), tear down; the JSON report."""
    target = target or PREFERENCES
    started = time.monotonic()
    machine = machine_info()
    all_cpus = os.sched_getaffinity(0)
    pin = args.pin and len(all_cpus) >= 2
    server_cpus = {min(all_cpus)} if pin else None
    client_cpus = all_cpus - {min(all_cpus)} if pin else None
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # this process (the serial client) and h2load, which it spawns
    params = H2loadParams(
        duration_s=args.duration,
        warmup_s=args.warmup,
        clients=args.clients,
        streams=args.streams,
        threads=args.threads or min(len(client_cpus or all_cpus), args.clients),
    )

    secret = secrets.token_urlsafe(32)
    service_token = mint_token(secret, "bench", ["service"], ttl_s=TOKEN_TTL_S)
    admin_token = mint_token(secret, "bench-admin", ["admin"], ttl_s=TOKEN_TTL_S)

    async with bench_database() as db:
        prefd = ChildServer(
            "prefd",
            [sys.executable, "-m", "server", "serve"],
            child_env(
                {
                    **db.env,
                    "PREFD_HOST": HOST,
                    "PREFD_PORT": "0",
                    "PREFD_JWT_SECRET": secret,
                    "PREFD_PRINT_TOKEN": "false",
                    "PREFD_GRACE_PERIOD_S": "1",
                }
            ),
            work_dir,
            server_cpus,
        )
        echo: ChildServer | None = None
        try:
            prefd.start()
            prefd_port = await prefd.wait_ready()
            if pin:
                db.unpin_embedded(all_cpus)

            log("writing overrides for the benchmark subject")
            await target.seed(prefd_port, admin_token)
            response_bytes = await get_effective_raw(prefd_port, service_token, target)
            captured = target.response_type.FromString(response_bytes)
            prefd_check = target.check(captured)
            payload = target.payload(captured)
            response_file = work_dir / "response.bin"
            response_file.write_bytes(response_bytes)
            log(f"prefd returned {payload} ({len(response_bytes)} bytes); starting echo")

            echo = ChildServer(
                "echo",
                [
                    sys.executable,
                    str(ECHO_SERVER),
                    "--host",
                    HOST,
                    "--port",
                    "0",
                    "--response-file",
                    str(response_file),
                    "--method",
                    target.method,
                ],
                child_env({}),
                work_dir,
                server_cpus,
            )
            echo.start()
            echo_port = await echo.wait_ready()
            if await get_effective_raw(echo_port, None, target) != response_bytes:
                raise RuntimeError("the echo server did not return the captured response")

            request = target.request
            body = work_dir / "request.grpc"
            body.write_bytes(grpc_frame(request.SerializeToString()))

            targets: dict[str, tuple[int, str | None]] = {
                "echo": (echo_port, None),
                "prefd": (prefd_port, service_token),
            }
            exact_checks = {}
            for name, (port, token) in targets.items():
                log(f"{name}: checking h2load's request gets full gRPC answers")
                exact_checks[name] = await check_h2load_exact(
                    params, port, body, token, len(response_bytes), target.method
                )
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for round_no in range(1, args.rounds + 1):
                for name, (port, token) in targets.items():
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
        "database": {"mode": db.mode, "name": db.name},
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
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def rounds_arg(text: str) -> int:
    """argparse type: at least 3 rounds, so the medians mean something."""
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError("at least 3 rounds, so the medians mean something")
    return value


def parse_args(argv: list[str] | None, description: str = PREFERENCES.description) -> argparse.Namespace:
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
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin servers to the first CPU and load generators to the rest (default on; needs >= 2 CPUs)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, target: ReadTarget | None = None) -> int:
    """Run the benchmark for `target` (default PREFERENCES: GetEffectivePreferences); 0 on success."""
    target = target or PREFERENCES
    args = parse_args(argv, target.description)
    if shutil.which("h2load") is None:
        print("h2load not found (Debian: apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    work_dir = Path(tempfile.mkdtemp(prefix="prefd-bench-"))  # child logs, request body, captured response
    try:
        report = asyncio.run(_main_cancellable(args, work_dir, target))
    except (KeyboardInterrupt, asyncio.CancelledError):
        shutil.rmtree(work_dir, ignore_errors=True)
        log("interrupted; servers stopped and the benchmark database removed")
        return 130
    except BaseException:
        log(f"failed; servers stopped, database removed, child logs kept in {work_dir}")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


async def _main_cancellable(args: argparse.Namespace, work_dir: Path, target: ReadTarget) -> dict[str, Any]:
    """run(), cancelled (so every finally block runs) on SIGTERM as well as on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args, work_dir, target)


if __name__ == "__main__":
    raise SystemExit(main())
