"""h2load against one gRPC method: the command line, running it, and parsing its summary.

h2load only sees HTTP status (a gRPC error is HTTP 200 too), so the DATA bytes it received are
checked against the size of one full response message per request.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.children import HOST

_DURATION = re.compile(r"^([\d.]+)(us|ms|s)$")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: compression flag 0, 4-byte big-endian length, payload."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


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
    """Identical h2load settings for every server a run loads."""

    duration_s: float
    warmup_s: float
    clients: int
    streams: int
    threads: int

    def argv(
        self, port: int | str, body: Path, token: str | None, *, method: str, requests: int | None = None
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
    params: H2loadParams, port: int, body: Path, token: str | None, message_bytes: int, method: str
) -> dict[str, Any]:
    """h2load's exact request (headers, body) gets a full gRPC answer every time, under full concurrency.

    With a fixed request count (-n) every response is complete, so the DATA bytes received must be
    exactly one framed response message (5 + message_bytes) per request; any gRPC error would fall short.
    """
    requests = params.clients * params.streams
    result = await exec_h2load(params.argv(port, body, token, method=method, requests=requests), timeout_s=120)
    expected = requests * (message_bytes + 5)
    if result["succeeded"] != requests or result["data_bytes"] != expected:
        raise RuntimeError(
            f"h2load -n {requests}: {result['succeeded']} succeeded with {result['data_bytes']} DATA bytes; "
            f"expected {requests} full responses = {expected} bytes (some calls answered with a gRPC error?)"
        )
    return {"requests": requests, "succeeded": result["succeeded"], "data_bytes": result["data_bytes"], "exact": True}


async def run_h2load(
    params: H2loadParams, port: int, body: Path, token: str | None, message_bytes: int, method: str
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
