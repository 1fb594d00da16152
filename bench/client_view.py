"""Benchmark: prefd.client's live view read from memory vs GetEffectivePreferences over the network,
and the time from a write's commit to the view's on_change callback.

What it measures
    local read: `view.get(key)` on a PreferencesView of a subject with overrides at ORG and USER,
        every call timed alone with perf_counter_ns (--reads calls); the empty timing loop's own
        cost is measured the same way and reported beside it (not subtracted).
    network read (the baseline, same run, same subject and client): GetEffectivePreferences of the
        same key through the same AsyncPrefdClient, serial, --rpcs calls.
    propagation: SetPreferences of the watched key, alternating values; from the write's response
        (the commit has happened) to the view's on_change callback, and from sending the write to
        the callback, over --writes writes.

Setup
    A fresh database (DATABASE_URL's server, else embedded), prefd as a child process on its own
    CPU when there are two (the client on the other), one client process.

Run it (from the repository root):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/client_view.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from harness.auth import Tokens
from harness.children import HOST, start_prefd
from harness.database import fresh_database
from harness.entry import run_main
from harness.pinning import Pinning
from harness.progress import log
from harness.stats import summary_us

from prefd.client import AsyncPrefdClient, KeyChange
from prefd.v1 import common_pb2, preferences_pb2

KEY = "display.items_per_page"


def _write(scope: common_pb2.Scope, key: str, value: int) -> preferences_pb2.SetPreferencesRequest:
    return preferences_pb2.SetPreferencesRequest(
        scope=scope,
        writes=[preferences_pb2.PreferenceWrite(key=key, value=common_pb2.TypedValue(int_value=value))],
    )


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    tokens = Tokens.new()
    pinning = Pinning.choose(not args.no_pin)
    pinning.apply_to_self()
    async with fresh_database() as db:
        prefd = await start_prefd(db, tokens, work_dir / "prefd", pinning.server)
        try:
            async with AsyncPrefdClient(f"{HOST}:{prefd.port}", token=tokens.admin, timeout_s=10) as client:
                user = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id="bench-user")
                org = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id="bench-org")
                await client.set_preferences(_write(org, KEY, 40))
                await client.set_preferences(_write(user, KEY, 50))
                view = await client.preferences("bench-user", "bench-org")
                assert view.get(KEY) == 50

                # Local reads, each timed alone; and the timer's own cost.
                get = view.get
                local: list[int] = []
                empty: list[int] = []
                clock = time.perf_counter_ns
                for _ in range(args.reads):
                    start = clock()
                    get(KEY)
                    local.append(clock() - start)
                    start = clock()
                    empty.append(clock() - start)
                log(f"{args.reads} local reads done")

                request = preferences_pb2.GetEffectivePreferencesRequest(
                    subject=common_pb2.Subject(user_id="bench-user", org_id="bench-org"), key_prefixes=[KEY]
                )
                network: list[int] = []
                for _ in range(args.rpcs):
                    start = clock()
                    reply = await client.get_effective_preferences(request)
                    network.append(clock() - start)
                assert reply.values[0].value.int_value == 50
                log(f"{args.rpcs} network reads done")

                arrived: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

                def on_change(changes: list[KeyChange]) -> None:
                    for change in changes:
                        if change.key == KEY:
                            arrived.put_nowait((clock(), change.new))

                view.on_change(on_change)
                after_commit: list[int] = []
                after_send: list[int] = []
                for n in range(args.writes):
                    value = 60 + n % 2
                    sent = clock()
                    await client.set_preferences(_write(user, KEY, value))
                    committed = clock()
                    while True:
                        at, seen = await asyncio.wait_for(arrived.get(), 10)
                        if seen == value:
                            break
                    after_commit.append(max(at - committed, 0))
                    after_send.append(at - sent)
                log(f"{args.writes} writes propagated")
                stale, snapshots = view.stale, view.snapshots
        finally:
            prefd.stop()
    local_summary, network_summary = summary_us(local), summary_us(network)
    return {
        "benchmark": "prefd.client live view: local read vs GetEffectivePreferences, and commit-to-callback",
        "baseline": "GetEffectivePreferences of the same key, same client and run, serial",
        "parameters": {"reads": args.reads, "rpcs": args.rpcs, "writes": args.writes},
        "pinning": pinning.describe(),
        "database": {"mode": db.mode, "name": db.name},
        "local_read": local_summary,
        "timer_overhead": summary_us(empty),
        "network_read": network_summary,
        "network_over_local_median": round(network_summary["median_us"] / local_summary["median_us"], 1),
        "commit_to_callback": summary_us(after_commit),
        "send_to_callback": summary_us(after_send),
        "view_after_run": {"stale": stale, "snapshots": snapshots},
        "target": "local read median <= 5 us",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=200_000, help="local reads (default 200,000)")
    parser.add_argument("--rpcs", type=int, default=2_000, help="GetEffectivePreferences calls (default 2,000)")
    parser.add_argument("--writes", type=int, default=300, help="writes to propagate (default 300)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin prefd and this process to CPUs")
    args = parser.parse_args()
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-view-")


if __name__ == "__main__":
    sys.exit(main())
