"""Shared plumbing for the change-feed benchmarks (watch_propagation, write_throughput, watch_memory).

The process and database handling follows bench/effective_read.py (whose ChildServer, child_env,
log and spawn_affinity are imported from there); what is added here:

* ``fresh_database()``: a new database ``prefd_bench_<random>`` on DATABASE_URL's server, or, without
  DATABASE_URL, on an embedded PostgreSQL (pgserver) that this process starts in a temporary
  directory. Either way the benchmark gets a DSN of its own, so it can query ``changes`` itself, and
  prefd gets it as DATABASE_URL (prefd never starts or stops the embedded server, so prefd can be
  restarted between rounds without restarting PostgreSQL). The database is dropped, and an embedded
  server stopped and its directory removed, at the end, even on error.
* ``Pinning``: on a machine with at least two CPUs the server runs on the first CPU and this
  process (the load generator) on the others; PostgreSQL is left unpinned.
* ``start_prefd()``: prefd as a child process (``python -m server serve``) on a random port.
* small statistics helpers (percentiles in milliseconds, least-squares fit) and ``run_main()``,
  which runs a benchmark's coroutine, cancels it on SIGTERM, and prints its JSON report.

Scripts in bench/ import this module (and effective_read) by name: run them as
``.venv/bin/python bench/<name>.py`` from the repository root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from effective_read import ChildServer as ChildServer  # re-exported for the benchmarks
from effective_read import child_env as child_env
from effective_read import log as log
from effective_read import machine_info as machine_info
from effective_read import positive_float as positive_float  # argparse types shared by the benchmarks
from effective_read import positive_int as positive_int
from effective_read import rounds_arg as rounds_arg
from effective_read import with_database

from server.auth import mint_token

HOST = "127.0.0.1"
TOKEN_TTL_S = 12 * 3600
PREFD_GRACE_S = "1"


# --------------------------------------------------------------------------- database


@dataclass(frozen=True)
class BenchDatabase:
    """The run's database: where it lives and the DSN for prefd and for this process."""

    mode: str  # "external" (DATABASE_URL's server) or "embedded" (pgserver started here)
    name: str
    dsn: str

    def describe(self) -> dict[str, str]:
        return {"mode": self.mode, "name": self.name}


@contextlib.asynccontextmanager
async def _embedded_server() -> AsyncIterator[str]:
    """An embedded PostgreSQL (pgserver) in a temporary directory; yields its postgres-database URL."""
    from pgserver import get_server  # only embedded runs need it

    data_dir = Path(tempfile.mkdtemp(prefix="prefd-bench-pg-"))
    server: Any = None
    try:
        server = await asyncio.to_thread(get_server, data_dir / "pg", cleanup_mode="stop")
        log(f"embedded PostgreSQL started in {data_dir}")
        uri: str = server.get_uri()
        yield uri
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.cleanup)
        shutil.rmtree(data_dir, ignore_errors=True)
        log(f"embedded PostgreSQL stopped and {data_dir} removed")


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[BenchDatabase]:
    """A new, empty database for this run (dropped at the end); see the module docstring."""
    async with contextlib.AsyncExitStack() as stack:
        server_url = os.environ.get("DATABASE_URL")
        mode = "external"
        if not server_url:
            server_url = await stack.enter_async_context(_embedded_server())
            mode = "embedded"
        name = f"prefd_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            log(f"created database {name} ({mode})")
            try:
                yield BenchDatabase(mode, name, with_database(server_url, name))
            finally:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                log(f"dropped database {name}")
        finally:
            await admin.close()


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the server and the load generator (this process) run on; None means unpinned."""

    enabled: bool
    server: set[int] | None
    client: set[int] | None

    @classmethod
    def choose(cls, pin: bool) -> Pinning:
        """Server on the first CPU, load generator on the rest, when asked and there are >= 2 CPUs."""
        cpus = os.sched_getaffinity(0)
        if not pin or len(cpus) < 2:
            return cls(False, None, None)
        first = min(cpus)
        return cls(True, {first}, cpus - {first})

    def apply_to_self(self) -> None:
        """Move this process (the load generator) to its CPUs."""
        if self.client is not None:
            os.sched_setaffinity(0, self.client)

    def describe(self, server_name: str = "prefd") -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            server_name: sorted(self.server) if self.server else "not pinned",
            "load_generator (this Python process)": sorted(self.client) if self.client else "not pinned",
            "postgresql": "not pinned",
        }


@dataclass(frozen=True)
class Tokens:
    """The JWT secret prefd is started with and tokens minted from it."""

    secret: str
    admin: str
    service: str

    @classmethod
    def new(cls) -> Tokens:
        secret = secrets.token_urlsafe(32)
        return cls(
            secret,
            admin=mint_token(secret, "bench-admin", ["admin"], ttl_s=TOKEN_TTL_S),
            service=mint_token(secret, "bench-service", ["service"], ttl_s=TOKEN_TTL_S),
        )


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata every prefd call needs."""
    return (("authorization", f"Bearer {token}"),)


def spawn_prefd(
    db: BenchDatabase, tokens: Tokens, log_dir: Path, cpus: set[int] | None, extra_env: dict[str, str] | None = None
) -> ChildServer:
    """Spawn prefd (`python -m server serve`) on a random port, logging into `log_dir`; not yet ready."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "DATABASE_URL": db.dsn,
        "PREFD_HOST": HOST,
        "PREFD_PORT": "0",
        "PREFD_JWT_SECRET": tokens.secret,
        "PREFD_PRINT_TOKEN": "false",
        "PREFD_GRACE_PERIOD_S": PREFD_GRACE_S,
        **(extra_env or {}),
    }
    prefd = ChildServer("prefd", [sys.executable, "-m", "server", "serve"], child_env(env), log_dir, cpus)
    prefd.start()
    return prefd


async def start_prefd(
    db: BenchDatabase, tokens: Tokens, log_dir: Path, cpus: set[int] | None, extra_env: dict[str, str] | None = None
) -> ChildServer:
    """spawn_prefd, then wait until it serves.

    The caller stops it (ChildServer.stop) in a finally block; it is stopped here if it never
    became ready.
    """
    prefd = spawn_prefd(db, tokens, log_dir, cpus, extra_env)
    try:
        await prefd.wait_ready()
    except BaseException:
        prefd.stop()
        raise
    return prefd


def read_rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of `pid` from /proc/<pid>/status, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            value, unit = rest.split()
            if unit != "kB":
                raise ValueError(f"unexpected unit in /proc/{pid}/status: {line!r}")
            found[name] = int(value) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (Linux /proc/<pid>/stat), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_tcp_port() -> int:
    """A TCP port on HOST that was free a moment ago (for prefd's metrics endpoint)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def scrape_counters(port: int, prefix: str) -> dict[str, float]:
    """Samples named `prefix`* from a Prometheus text endpoint on HOST:port (fetched off the event loop)."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    text = await asyncio.to_thread(fetch)
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of already sorted values."""
    if not sorted_values:
        raise ValueError("no samples")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


def percentiles_ms(samples_ns: Sequence[int]) -> dict[str, float | int | None]:
    """n, p50, p90, p99 and max of nanosecond samples, in milliseconds (None without samples)."""
    if not samples_ns:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(samples_ns)
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50) / 1e6, 3),
        "p90": round(percentile(ordered, 90) / 1e6, 3),
        "p99": round(percentile(ordered, 99) / 1e6, 3),
        "max": round(ordered[-1] / 1e6, 3),
    }


def median_or_none(values: Sequence[float | int | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [float(v) for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, digits)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares line y = slope * x + intercept, with R²."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("a fit needs at least two distinct x values")
    mean_x = statistics.fmean(xs)
    mean_y = statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


# --------------------------------------------------------------------------- report and CLI


def loadavg_1m() -> float:
    """The 1-minute load average now (noise context for a round)."""
    return round(os.getloadavg()[0], 2)


def run_main(benchmark: Callable[[Path], Awaitable[dict[str, Any]]], prefix: str) -> int:
    """Run `benchmark(work_dir)`, print its report as JSON on stdout; 130 when interrupted.

    SIGTERM and Ctrl-C cancel the benchmark's task, so every finally block (child processes,
    database) runs. Child logs in work_dir are removed on success and kept (and named) on failure.
    """
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))

    async def cancellable() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await benchmark(work_dir)

    try:
        report = asyncio.run(cancellable())
    except (KeyboardInterrupt, asyncio.CancelledError):
        shutil.rmtree(work_dir, ignore_errors=True)
        log("interrupted; servers stopped and the benchmark database removed")
        return 130
    except BaseException:
        log(f"failed; servers stopped, database removed, child logs kept in {work_dir}")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


class StreamSet:
    """Streams a benchmark holds open and the tasks reading them; close() cancels both."""

    def __init__(self) -> None:
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def close(self) -> None:
        """Cancel every stream and its reader."""
        self._closing = True
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._calls.clear()
        self._tasks.clear()
