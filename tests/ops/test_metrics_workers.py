"""`prefd serve --workers N` with a metrics port: one endpoint serves every worker's series, merged."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.ops.metrics_merge import SUMMED_GAUGES, WORKER_SCRAPE_TIMEOUT_S, WorkersCollector
from tests.helpers.auth import auth, unique
from tests.helpers.processes import prefd_process
from tests.helpers.settings import serve_env
from tests.test_workers import worker_pid

ADMIN = auth("admin")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
GET = "method=GetEffectivePreferences,service=prefd.v1.PreferencesService"
HEALTH = "method=GetSystemHealth,service=prefd.v1.HealthService"
# How each gauge family a worker exports appears on the one endpoint (the module docstring's table).
GAUGES = {
    "prefd_watch_streams": "sum",
    "prefd_db_pool_connections": "sum",
    "prefd_db_pool_waiting": "sum",
    "prefd_db_pool_max": "sum",
    "prefd_cache_bytes": "sum",
    "prefd_cache_budget_bytes": "sum",
    "prefd_cache_entries": "sum",
    "prefd_feed_lag_seconds": "worker",
    "prefd_feed_seconds_since_read": "worker",
    "prefd_feed_horizon_held_seconds": "worker",
}
SUMMED = ("counter", "histogram", "summary")


def series(families: Iterable[Metric]) -> dict[str, float]:
    """Each sample as `name{label=value,...}` (labels sorted); fails on a series that appears twice."""
    keys = [
        (s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}", s.value)
        for family in families
        for s in family.samples
    ]
    twice = [key for key, n in Counter(key for key, _ in keys).items() if n > 1]
    assert not twice, f"duplicate series: {twice}"
    return dict(keys)


def get_metrics(port: int, accept: str | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WORKER_SCRAPE_TIMEOUT_S + 10)
    try:
        connection.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


async def scrape(port: int) -> tuple[list[Metric], dict[str, float]]:
    status, text = await asyncio.to_thread(get_metrics, port)
    assert status == 200, text
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), "a family appears twice"
    return families, series(families)


def listening_addresses(port: int) -> list[str]:
    """Every address a TCP socket of this machine's network namespace listens on at `port` (IPv4 and IPv6)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, words))
    return found


async def printed(lines: list[str], pattern: str, count: int) -> list[re.Match[str]]:
    """The first `count` lines the server printed that match `pattern`, waiting up to a minute for them."""
    async with asyncio.timeout(60):
        while True:
            found = [match for line in lines if (match := re.match(pattern, line))]
            if len(found) >= count:
                return found[:count]
            await asyncio.sleep(0.02)  # the drain task appends lines as the server prints them


def process_state(pid: int) -> str:
    """The state letter /proc shows for `pid` ("R", "S", "Z", ...), "X" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


async def until_dead(pid: int) -> None:
    """Wait until process `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    async with asyncio.timeout(10):
        while True:
            if process_state(pid) in ("Z", "X"):
                return
            await asyncio.sleep(0.01)  # SIGKILL is delivered asynchronously


@contextlib.asynccontextmanager
async def serving_two_workers(env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, list[str]]]:
    """`prefd serve --workers 2`, stopped with SIGTERM whatever happens: it stops the workers too, where
    SIGKILL would leave them running, holding the output pipe open."""
    async with prefd_process(env, "--workers", "2") as (proc, port, lines):
        try:
            yield proc, port, lines
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    await proc.wait()


async def test_one_endpoint_sums_counters_keeps_gauges_as_documented_and_survives_a_dead_worker(
    fresh_database,
) -> None:
    url = await fresh_database()
    env = serve_env(url, PREFD_METRICS_PORT="0", PREFD_METRICS_HOST="127.0.0.1")
    async with serving_two_workers(env) as (proc, port, lines):
        ready = await printed(lines, r"prefd serving on port \d+ \(worker (\d), pid (\d+), metrics on (\S+):(\d+)\)", 2)
        (merged_line,) = await printed(lines, r"prefd metrics on port (\d+)", 1)
        metrics_port = int(merged_line.group(1))
        workers = {match.group(2): (match.group(1), int(match.group(4))) for match in ready}  # pid: (index, port)
        assert sorted(index for index, _ in workers.values()) == ["0", "1"]
        for match in ready:
            assert match.group(3) == "127.0.0.1"
            assert listening_addresses(int(match.group(4))) == ["127.0.0.1"]
        assert metrics_port not in {worker_port for _, worker_port in workers.values()}

        # Each new connection is hashed to one worker; keep opening until both have answered.
        channels: dict[str, grpc.aio.Channel] = {}
        health_calls: Counter[str] = Counter()
        try:
            async with asyncio.timeout(30):
                while len(channels) < 2:
                    channel = grpc.aio.insecure_channel(
                        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                    pid = await worker_pid(channel)
                    health_calls[pid] += 1
                    if pid in channels:
                        await channel.close()
                    else:
                        channels[pid] = channel
            (pid_a, _), (pid_b, channel_b) = channels.items()
            calls = {pid_a: 3, pid_b: 5}
            request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
            for pid, channel in channels.items():
                for _ in range(calls[pid]):
                    await preferences_pb2_grpc.PreferencesServiceStub(channel).GetEffectivePreferences(
                        request, metadata=ADMIN
                    )

            own = {pid: (await scrape(worker_port))[0] for pid, (_, worker_port) in workers.items()}
            families, merged = await scrape(metrics_port)
            for pid, (index, _) in workers.items():
                assert series(own[pid])[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == calls[pid]
                assert merged[f"prefd_metrics_worker_up{{worker={index}}}"] == 1
                assert merged[f"prefd_metrics_worker_scrape_errors_total{{worker={index}}}"] == 0
            assert merged[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == 8
            assert merged[f"prefd_rpc_duration_seconds_count{{{GET}}}"] == 8
            assert merged[f"prefd_rpc_duration_seconds_bucket{{le=+Inf,{GET}}}"] == 8
            assert merged[f"prefd_rpc_calls_total{{code=OK,{HEALTH}}}"] == sum(health_calls.values())
            assert merged[f"prefd_rpc_duration_seconds_sum{{{GET}}}"] == sum(
                series(own[pid])[f"prefd_rpc_duration_seconds_sum{{{GET}}}"] for pid in own
            )

            # Every counter and histogram sample is the workers' sum (`_created`: the earliest worker's).
            own_series = {pid: series(families) for pid, families in own.items()}
            counted = {
                name
                for families_of_worker in own.values()
                for family in families_of_worker
                if family.type in SUMMED or family.name.endswith("_created")
                for name in series([family])
            }
            assert f"prefd_rpc_calls_total{{code=OK,{GET}}}" in counted
            for name in counted:
                present = [own_series[pid][name] for pid in own if name in own_series[pid]]
                assert merged[name] == (min(present) if "_created{" in name else sum(present)), name

            # Every gauge family is merged as documented: summed without a worker label, or one per worker.
            gauges = {f.name for fams in own.values() for f in fams if f.type == "gauge"}
            created = {name for name in gauges if name.endswith("_created")}
            assert gauges - created == GAUGES.keys(), "document how a new gauge merges in metrics_merge.py"
            assert {name for name, how in GAUGES.items() if how == "sum"} == SUMMED_GAUGES
            by_name = {family.name: family for family in families}
            for name, how in GAUGES.items():
                workers_seen = {s.labels.get("worker") for s in by_name[name].samples}
                assert workers_seen == ({None} if how == "sum" else {"0", "1"}), name
            pool_max = "prefd_db_pool_max{}"
            assert merged[pool_max] == sum(series(own[pid])[pool_max] for pid in own)

            # The OpenMetrics rendering (what Prometheus asks for) passes prometheus_client's strict parser.
            status, text = await asyncio.to_thread(get_metrics, metrics_port, OPENMETRICS)
            assert status == 200 and text.endswith("# EOF\n")
            assert series(parse_openmetrics(text))[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == 8

            # A worker that stops answering is left out after the timeout: its counters stay, its gauges go.
            index_a = workers[pid_a][0]
            index_b = workers[pid_b][0]
            lag_a = f"prefd_feed_lag_seconds{{worker={index_a}}}"
            lag_b = f"prefd_feed_lag_seconds{{worker={index_b}}}"
            errors_a = f"prefd_metrics_worker_scrape_errors_total{{worker={index_a}}}"
            up_a = f"prefd_metrics_worker_up{{worker={index_a}}}"
            proc_a = int(pid_a)
            os.kill(proc_a, signal.SIGSTOP)
            try:
                started = time.monotonic()
                _, stalled = await scrape(metrics_port)
                assert time.monotonic() - started < WORKER_SCRAPE_TIMEOUT_S + 2
            finally:
                os.kill(proc_a, signal.SIGCONT)
            assert (stalled[up_a], stalled[errors_a]) == (0, 1)
            assert stalled[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == 8
            assert lag_a not in stalled and lag_b in stalled
            _, resumed = await scrape(metrics_port)
            assert (resumed[up_a], resumed[errors_a]) == (1, 1) and lag_a in resumed

            # A worker killed outright: the scrape still answers with the survivor's series.
            os.kill(proc_a, signal.SIGKILL)
            await until_dead(proc_a)
            _, survivors = await scrape(metrics_port)
            assert (survivors[up_a], survivors[errors_a]) == (0, 2)
            assert survivors[f"prefd_metrics_worker_up{{worker={index_b}}}"] == 1
            assert survivors[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == 8
            assert lag_a not in survivors and lag_b in survivors
            for _ in range(2):
                await preferences_pb2_grpc.PreferencesServiceStub(channel_b).GetEffectivePreferences(
                    request, metadata=ADMIN
                )
            _, later = await scrape(metrics_port)
            assert later[f"prefd_rpc_calls_total{{code=OK,{GET}}}"] == 10
            assert later[errors_a] == 3
        finally:
            for channel in channels.values():
                await channel.close()
    assert proc.returncode not in (None, 0)  # a worker was killed


def worker_registry(calls: dict[str, int], lag: float) -> CollectorRegistry:
    """A registry shaped like a worker's: a counter, a histogram, a summed gauge and a per-worker one."""
    registry = CollectorRegistry()
    counter = PromCounter("prefd_rpc_calls", "RPCs", ["method"], registry=registry)
    latency = Histogram("prefd_rpc_duration_seconds", "Latency", ["method"], buckets=(0.1, 1), registry=registry)
    for method, count in calls.items():
        counter.labels(method).inc(count)
        for _ in range(count):
            latency.labels(method).observe(0.5)
    Gauge("prefd_db_pool_max", "Pool bound", registry=registry).set(10)
    Gauge("prefd_feed_lag_seconds", "Lag", registry=registry).set(lag)
    return registry


def test_merge_sums_by_label_set_keeps_a_silent_workers_counters_and_renders_openmetrics() -> None:
    texts = {
        1: generate_latest(worker_registry({"Get": 3}, 0.25)).decode(),
        2: generate_latest(worker_registry({"Get": 5, "Set": 2}, 0.5)).decode(),
    }
    silent: set[int] = set()

    def fetch(port: int, _timeout_s: float) -> str:
        if port in silent:
            raise ConnectionRefusedError(port)
        return texts[port]

    registry = CollectorRegistry()
    registry.register(WorkersCollector(2, lambda: {0: 1, 1: 2}, fetch=fetch))
    merged = series(text_string_to_metric_families(generate_latest(registry).decode()))
    assert merged["prefd_rpc_calls_total{method=Get}"] == 8
    assert merged["prefd_rpc_calls_total{method=Set}"] == 2
    assert merged["prefd_rpc_duration_seconds_bucket{le=1.0,method=Get}"] == 8
    assert merged["prefd_rpc_duration_seconds_bucket{le=0.1,method=Get}"] == 0
    assert merged["prefd_rpc_duration_seconds_sum{method=Get}"] == 4.0
    assert merged["prefd_rpc_duration_seconds_count{method=Set}"] == 2
    created = [
        series(text_string_to_metric_families(text))["prefd_rpc_calls_created{method=Get}"] for text in texts.values()
    ]
    assert merged["prefd_rpc_calls_created{method=Get}"] == min(created)
    assert merged["prefd_db_pool_max{}"] == 20
    assert (merged["prefd_feed_lag_seconds{worker=0}"], merged["prefd_feed_lag_seconds{worker=1}"]) == (0.25, 0.5)
    om = series(parse_openmetrics(generate_openmetrics(registry).decode()))
    assert om["prefd_rpc_calls_total{method=Set}"] == 2
    assert om["prefd_rpc_duration_seconds_bucket{le=+Inf,method=Get}"] == 8

    silent.add(2)
    texts[1] = generate_latest(worker_registry({"Get": 4}, 0.25)).decode()
    after = series(text_string_to_metric_families(generate_latest(registry).decode()))
    assert after["prefd_rpc_calls_total{method=Get}"] == 9  # worker 1's last answer still counts
    assert after["prefd_rpc_calls_total{method=Set}"] == 2
    assert after["prefd_db_pool_max{}"] == 10
    assert "prefd_feed_lag_seconds{worker=1}" not in after
    assert after["prefd_metrics_worker_up{worker=1}"] == 0
    assert after["prefd_metrics_worker_scrape_errors_total{worker=1}"] == 1
    assert after["prefd_metrics_worker_scrape_errors_total{worker=0}"] == 0
