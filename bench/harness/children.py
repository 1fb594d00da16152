"""Server child processes: prefd, and the baselines bench/echo_server.py, bench/idle_watch_server.py and
bench/fanout_floor_server.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.auth import Tokens
from harness.database import BenchDatabase
from harness.pinning import spawn_affinity
from harness.progress import log

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
ECHO_SERVER = BENCH / "echo_server.py"
IDLE_WATCH_SERVER = BENCH / "idle_watch_server.py"
FANOUT_FLOOR_SERVER = BENCH / "fanout_floor_server.py"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
PREFD_GRACE_S = "1"


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
        self.log_dir.mkdir(parents=True, exist_ok=True)
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

    async def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S, workers: int = 1) -> int:
        """Wait for the port line on stdout (one per worker when it runs `workers` server processes); raise
        with the child's stderr tail if it exits first."""
        assert self.proc is not None
        pattern = re.compile(rf"^{re.escape(self.name)} serving on port (\d+)(?:$| \(worker )", re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ports = pattern.findall(self.stdout_path.read_text(errors="replace"))
            if len(ports) >= workers:
                self.port = int(ports[0])
                log(f"{self.name} serving on port {self.port}" + (f" ({workers} workers)" if workers > 1 else ""))
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 30) -> str:
        """The last `lines` lines the child wrote to stderr."""
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


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without prefd's own settings, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFD_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(extra)
    return env


def spawn_prefd(
    db: BenchDatabase, tokens: Tokens, log_dir: Path, cpus: set[int] | None, extra_env: dict[str, str] | None = None
) -> ChildServer:
    """Spawn prefd (`python -m prefd_server serve`) on a random port, logging into `log_dir`; not yet ready."""
    env = {
        "DATABASE_URL": db.dsn,
        "PREFD_HOST": HOST,
        "PREFD_PORT": "0",
        "PREFD_JWT_SECRET": tokens.secret,
        "PREFD_PRINT_TOKEN": "false",
        "PREFD_GRACE_PERIOD_S": PREFD_GRACE_S,
        **(extra_env or {}),
    }
    prefd = ChildServer("prefd", [sys.executable, "-m", "prefd_server", "serve"], child_env(env), log_dir, cpus)
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
        await prefd.wait_ready(workers=int((extra_env or {}).get("PREFD_WORKERS", "1")))
    except BaseException:
        prefd.stop()
        raise
    return prefd


def spawn_echo(log_dir: Path, cpus: set[int] | None, response_file: Path, method: str) -> ChildServer:
    """Spawn bench/echo_server.py answering `method` with `response_file`'s bytes; not yet ready."""
    argv = [
        sys.executable,
        str(ECHO_SERVER),
        "--host",
        HOST,
        "--port",
        "0",
        "--response-file",
        str(response_file),
        "--method",
        method,
    ]
    echo = ChildServer("echo", argv, child_env({}), log_dir, cpus)
    echo.start()
    return echo


def spawn_idle_watch(log_dir: Path, cpus: set[int] | None) -> ChildServer:
    """Spawn bench/idle_watch_server.py; not yet ready."""
    argv = [sys.executable, str(IDLE_WATCH_SERVER), "--host", HOST, "--port", "0"]
    server = ChildServer("idle", argv, child_env({}), log_dir, cpus)
    server.start()
    return server


def spawn_fanout_floor(log_dir: Path, cpus: set[int] | None) -> ChildServer:
    """Spawn bench/fanout_floor_server.py (it prints `floor serving on port N`); not yet ready."""
    argv = [sys.executable, str(FANOUT_FLOOR_SERVER), "--host", HOST, "--port", "0"]
    server = ChildServer("floor", argv, child_env({}), log_dir, cpus)
    server.start()
    return server


async def start_fanout_floor(log_dir: Path, cpus: set[int] | None) -> ChildServer:
    """spawn_fanout_floor, then wait until it serves; stopped here if it never became ready."""
    server = spawn_fanout_floor(log_dir, cpus)
    try:
        await server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
