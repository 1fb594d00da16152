"""Benchmark: GetDatabaseHealth latency on a database holding one million change rows.

What it measures
    ``/prefd.v1.HealthService/GetDatabaseHealth`` (the full report: database totals, every prefd
    table and index, connections, pg_stat_statements or why not, alerts), serial calls, against
    ``/prefd.v1.HealthService/GetSystemHealth`` (one SELECT 1, the feed and Redis checks) on the same
    server in the same run as the baseline: the ratio says what the report itself costs. Seed 001
    asks for database health queries under 500 ms.

Setup
    A fresh database (DATABASE_URL's server, else embedded), prefd as a child process; --rows change
    rows inserted as bench/list_changes.py does (harness.seed), then ANALYZE.

Run it (from the repository root):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/database_health.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, start_prefd
from harness.database import fresh_database
from harness.entry import run_main
from harness.pinning import Pinning
from harness.progress import log
from harness.seed import seed_change_rows
from harness.stats import percentiles_ms

from prefd.v1 import health_pb2, health_pb2_grpc


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    tokens = Tokens.new()
    pinning = Pinning.choose(not args.no_pin)
    pinning.apply_to_self()
    meta = auth_metadata(tokens.admin)
    async with fresh_database() as db:
        prefd = await start_prefd(db, tokens, work_dir / "prefd", pinning.server)
        try:
            started = time.monotonic()
            await seed_change_rows(db.dsn, args.rows)
            log(f"seeded {args.rows} change rows in {time.monotonic() - started:.1f} s")
            async with grpc.aio.insecure_channel(f"{HOST}:{prefd.port}") as channel:
                stub = health_pb2_grpc.HealthServiceStub(channel)
                report_ns: list[int] = []
                system_ns: list[int] = []
                for _ in range(args.samples):
                    start = time.perf_counter_ns()
                    report = await stub.GetDatabaseHealth(health_pb2.GetDatabaseHealthRequest(), metadata=meta)
                    report_ns.append(time.perf_counter_ns() - start)
                    start = time.perf_counter_ns()
                    await stub.GetSystemHealth(health_pb2.GetSystemHealthRequest(), metadata=meta)
                    system_ns.append(time.perf_counter_ns() - start)
                changes = next(t for t in report.tables if t.name == "changes")
        finally:
            prefd.stop()
    report_ms, system_ms = percentiles_ms(report_ns), percentiles_ms(system_ns)
    return {
        "benchmark": "GetDatabaseHealth latency at one million change rows",
        "method": "/prefd.v1.HealthService/GetDatabaseHealth",
        "baseline": "GetSystemHealth on the same server, alternating calls, same run",
        "parameters": {"rows": args.rows, "samples": args.samples},
        "pinning": pinning.describe(),
        "database": {"mode": db.mode, "name": db.name},
        "report": {
            "tables": len(report.tables),
            "indexes": len(report.indexes),
            "changes_live_rows": changes.live_rows,
            "slow_queries_available": report.slow_queries.available,
            "alerts": [a.code for a in report.alerts],
        },
        "get_database_health_ms": report_ms,
        "get_system_health_ms": system_ms,
        "p50_ratio": round(report_ms["p50"] / system_ms["p50"], 2) if report_ms["p50"] and system_ms["p50"] else None,
        "target": "p99 < 500 ms (seed 001)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="change rows to seed (default 1,000,000)")
    parser.add_argument("--samples", type=int, default=100, help="calls of each RPC (default 100)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin prefd and this process to CPUs")
    args = parser.parse_args()
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-dbhealth-")


if __name__ == "__main__":
    sys.exit(main())
