"""The figures behind deploy/'s resource requests: prefd's resident memory idle and under load.

Starts `python -m prefd_server serve` on a fresh database (created on DATABASE_URL's server, dropped
at the end) with REDIS_URL's Redis, reads /proc/<pid>/status VmRSS once the server reports SERVING
and 5 s later, then runs a mixed load for --duration seconds: 64 concurrent callers, each call a
GetEffectivePreferences (80%) or a SetPreferences (20%) of one of 20,000 users, with 500 watch
streams open. Reports the peak VmRSS, VmHWM, the server's CPU time per second and the bytes the
in-process caches hold (`prefd_cache_bytes` from /metrics), so that base = RSS - cache bytes.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python deploy/measure_memory.py --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
import urllib.request
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.rpc.auth import mint_token

USERS = 20_000
CALLERS = 64
WATCHES = 500
WRITE_FRACTION = 0.2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cache_bytes(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("prefd_cache_bytes{"))


async def _wait_serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await health.Check(request, timeout=1)).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        # Polling the readiness condition itself, bounded by the deadline above.
        await asyncio.sleep(0.2)
    raise RuntimeError("prefd did not report SERVING")


async def _load(
    stub: preferences_pb2_grpc.PreferencesServiceStub, token: str, duration_s: float, pid: int
) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    rng = random.Random(7)
    counts = {"writes": 0, "reads": 0, "errors": 0}
    stop = time.monotonic() + duration_s

    async def caller() -> None:
        while time.monotonic() < stop:
            user = f"u-{rng.randrange(USERS)}"
            try:
                if rng.random() < WRITE_FRACTION:
                    value = common_pb2.TypedValue(string_value=rng.choice(["dark", "light", "system"]))
                    await stub.SetPreferences(
                        preferences_pb2.SetPreferencesRequest(
                            scope=common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=user),
                            writes=[preferences_pb2.PreferenceWrite(key="display.theme", value=value)],
                            reason="measure_memory",
                            org_id="org-1",
                        ),
                        metadata=metadata,
                        timeout=30,
                    )
                    counts["writes"] += 1
                else:
                    subject = common_pb2.Subject(user_id=user, org_id="org-1")
                    request = preferences_pb2.GetEffectivePreferencesRequest(subject=subject)
                    await stub.GetEffectivePreferences(request, metadata=metadata, timeout=30)
                    counts["reads"] += 1
            except grpc.aio.AioRpcError:
                counts["errors"] += 1

    async def drain(call: Any) -> None:
        try:
            async for _ in call:
                pass
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass

    watches = [
        stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=f"u-{i}", org_id="org-1")),
            metadata=metadata,
        )
        for i in range(WATCHES)
    ]
    drains = [asyncio.create_task(drain(call)) for call in watches]
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while time.monotonic() < stop:
            peak = max(peak, _status_kib(pid, "VmRSS"))
            await asyncio.sleep(0.25)

    cpu_before = _cpu_s(pid)
    await asyncio.gather(sample(), *(caller() for _ in range(CALLERS)))
    cpu_cores = (_cpu_s(pid) - cpu_before) / duration_s
    for call in watches:
        call.cancel()
    await asyncio.gather(*drains)
    return {**counts, "peak_rss_kib": peak, "vm_hwm_kib": _status_kib(pid, "VmHWM"), "cpu_cores": round(cpu_cores, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    args = parser.parse_args()
    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = "prefd_measure_" + secrets.token_hex(4)
    admin = await asyncpg.connect(server_url)
    await admin.execute(f"CREATE DATABASE {database}")
    port, metrics_port = _free_port(), _free_port()
    secret = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "DATABASE_URL": server_url.rsplit("/", 1)[0] + "/" + database,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "PREFD_JWT_SECRET": secret,
        "PREFD_HOST": "127.0.0.1",
        "PREFD_PORT": str(port),
        "PREFD_METRICS_PORT": str(metrics_port),
        "PREFD_LOG_LEVEL": "WARNING",
    }
    report: dict[str, Any] = {"duration_s": args.duration, "callers": CALLERS, "watches": WATCHES}
    with tempfile.TemporaryDirectory() as workdir:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "prefd_server", "serve", env=env, cwd=workdir, stdout=asyncio.subprocess.DEVNULL
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await _wait_serving(channel, 60)
                report["idle_rss_kib_at_serving"] = _status_kib(server.pid, "VmRSS")
                await asyncio.sleep(5)  # idle on purpose: the figure is the server after 5 s of nothing
                report["idle_rss_kib_after_5s"] = _status_kib(server.pid, "VmRSS")
                report["idle_cache_bytes"] = _cache_bytes(metrics_port)
                token = mint_token(secret, "measure", ["admin"], ttl_s=3600)
                stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
                report["load"] = await _load(stub, token, args.duration, server.pid)
                report["load"]["cache_bytes"] = _cache_bytes(metrics_port)
                report["load"]["base_mib"] = round(
                    (report["load"]["peak_rss_kib"] * 1024 - report["load"]["cache_bytes"]) / 2**20, 1
                )
        finally:
            server.terminate()
            async with asyncio.timeout(60):
                await server.wait()
            await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
            await admin.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
