"""Benchmark: ListChanges latency at one million change rows, first page against a deep page.

What it measures
    ``/prefd.v1.AuditService/ListChanges`` (page_size 100, oldest first: every preference change,
    every change by one actor, and one scope's changes) on a table of --rows change rows. The
    baseline is the first page of the same query in the same run: keyset pagination should keep a
    page deep in the table (--depth of the way through) within 2x of the first page. Each latency
    is the median of --samples serial calls, first and deep pages alternating.

Setup
    A fresh database (harness.database: DATABASE_URL's server, else embedded). prefd runs as a child
    process and migrates it; the change rows are then inserted directly (harness.seed) in transactions
    of 20,000 rows (1,000 scopes, 50 keys each; inserting is what the append-only table allows). The
    deep page's token is reached by paging through the listing with page_size 1,000 until --depth.

Run it (from the repository root):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/list_changes.py
"""

from __future__ import annotations

import argparse
import statistics
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

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2


async def page_token_at(
    stub: audit_pb2_grpc.AuditServiceAsyncStub, request: audit_pb2.ListChangesRequest, depth: int, meta: Any
) -> str:
    """The token of the page that starts `depth` rows (a multiple of 100) into the listing."""
    walker = audit_pb2.ListChangesRequest()
    walker.CopyFrom(request)
    walker.page_size = 1000 if depth % 1000 == 0 and depth >= 10_000 else 100
    seen = 0
    token = ""
    while seen < depth:
        walker.page_token = token
        page = await stub.ListChanges(walker, metadata=meta)
        seen += len(page.changes)
        token = page.next_page_token
        if not token:
            raise SystemExit(f"the listing ended after {seen} rows, before depth {depth}")
    # Same query as `request` (page_size is not part of the query), so the token fits it.
    return token


async def measure(
    stub: audit_pb2_grpc.AuditServiceAsyncStub,
    request: audit_pb2.ListChangesRequest,
    token: str,
    samples: int,
    meta: Any,
) -> dict[str, Any]:
    first_ms: list[float] = []
    deep_ms: list[float] = []
    deep = audit_pb2.ListChangesRequest()
    deep.CopyFrom(request)
    deep.page_token = token
    for _ in range(samples):
        for target, sink in ((request, first_ms), (deep, deep_ms)):
            started = time.perf_counter_ns()
            page = await stub.ListChanges(target, metadata=meta)
            sink.append((time.perf_counter_ns() - started) / 1e6)
            assert len(page.changes) == request.page_size
    first, deep_median = statistics.median(first_ms), statistics.median(deep_ms)
    return {
        "first_page_median_ms": round(first, 3),
        "deep_page_median_ms": round(deep_median, 3),
        "deep_over_first": round(deep_median / first, 3),
        "first_page_p90_ms": round(sorted(first_ms)[int(0.9 * len(first_ms))], 3),
        "deep_page_p90_ms": round(sorted(deep_ms)[int(0.9 * len(deep_ms))], 3),
    }


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
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                shapes = {
                    # Preference changes only: the shipped definitions' larger rows open the table and
                    # would make the first page heavier than any other.
                    "all_preference_changes": (
                        audit_pb2.ListChangesRequest(page_size=100, kinds=[common_pb2.CHANGE_KIND_PREFERENCE]),
                        int(args.rows * args.depth) // 1000 * 1000,
                    ),
                    "one_actor": (
                        audit_pb2.ListChangesRequest(page_size=100, actor="bench-admin"),
                        int(args.rows * args.depth) // 1000 * 1000,
                    ),
                    "one_scope": (
                        audit_pb2.ListChangesRequest(
                            page_size=100, scope=common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id="bench-user-7")
                        ),
                        int(args.rows / 1000 * args.depth) // 100 * 100,
                    ),
                }
                results = {}
                for name, (request, depth) in shapes.items():
                    token = await page_token_at(stub, request, depth, meta)
                    log(f"{name}: measuring first page vs the page at row {depth}")
                    results[name] = {"depth_rows": depth, **await measure(stub, request, token, args.samples, meta)}
        finally:
            prefd.stop()
    return {
        "benchmark": "ListChanges first page vs a deep page (keyset pagination)",
        "method": "/prefd.v1.AuditService/ListChanges",
        "baseline": "the first page of the same query, same run, alternating calls",
        "parameters": {"rows": args.rows, "depth": args.depth, "samples": args.samples, "page_size": 100},
        "pinning": pinning.describe(),
        "database": {"mode": db.mode, "name": db.name},
        "results": results,
        "target": "deep_over_first <= 2",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="change rows to seed (default 1,000,000)")
    parser.add_argument("--depth", type=float, default=0.9, help="how far into the listing the deep page is")
    parser.add_argument("--samples", type=int, default=200, help="calls per page kind (default 200)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin prefd and this process to CPUs")
    args = parser.parse_args()
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-list-")


if __name__ == "__main__":
    sys.exit(main())
