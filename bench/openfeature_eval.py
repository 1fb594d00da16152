"""Benchmark: an OpenFeature evaluation through the SDK and prefd's provider vs a bare live-view read
of the same key (what the SDK and the provider add to a local read).

What it measures (every call timed alone with perf_counter_ns; the empty timing loop's own cost is
reported beside, not subtracted)
    view.get: `view.get(key)` on an AsyncPrefdClient PreferencesView of the subject (the baseline).
    provider: `PrefdProvider.resolve_boolean_details` / `resolve_string_details` called directly (the
        provider's own work: subject look-up, type check, reason and metadata from provenance).
    sdk: `client.get_boolean_value`, `client.get_boolean_details`, `client.get_string_details` of the
        OpenFeature SDK with the provider registered (context merging, hooks, type check, details),
        and `await client.get_boolean_value_async` for the async path.
    Every evaluation is of one subject (user with a USER override of the bool key, org with an ORG
    override of the string key) whose view the provider holds open; the ratios are medians over the
    bare view.get median of the same key.

Setup
    A fresh database (DATABASE_URL's server, else embedded), prefd as a child process on its own CPU
    when there are two (this process on the other), the provider's event loop thread in this process.

Run it (from the repository root):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/openfeature_eval.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness.auth import Tokens
from harness.children import HOST, start_prefd
from harness.database import fresh_database
from harness.entry import run_main
from harness.pinning import Pinning
from harness.progress import log
from harness.stats import summary_us
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import Reason

from prefd.client import AsyncPrefdClient
from prefd.client.openfeature import PrefdProvider
from prefd.v1 import common_pb2, preferences_pb2

BOOL_KEY = "notifications.email.enabled"
STRING_KEY = "locale.timezone"
USER_ID, ORG_ID = "bench-user", "bench-org"


def _timed(call: Callable[[], Any], n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(n):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


async def _timed_async(call: Callable[[], Awaitable[Any]], n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(n):
        start = clock()
        await call()
        samples.append(clock() - start)
    return samples


def _write(scope: common_pb2.Scope, key: str, value: common_pb2.TypedValue) -> preferences_pb2.SetPreferencesRequest:
    return preferences_pb2.SetPreferencesRequest(
        scope=scope, writes=[preferences_pb2.PreferenceWrite(key=key, value=value)]
    )


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    tokens = Tokens.new()
    pinning = Pinning.choose(not args.no_pin)
    pinning.apply_to_self()
    async with fresh_database() as db:
        prefd = await start_prefd(db, tokens, work_dir / "prefd", pinning.server)
        try:
            target = f"{HOST}:{prefd.port}"
            async with AsyncPrefdClient(target, token=tokens.admin, timeout_s=10) as client:
                user = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=USER_ID)
                org = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=ORG_ID)
                await client.set_preferences(_write(user, BOOL_KEY, common_pb2.TypedValue(bool_value=False)))
                await client.set_preferences(_write(org, STRING_KEY, common_pb2.TypedValue(string_value="Asia/Tokyo")))
                view = await client.preferences(USER_ID, ORG_ID)
                assert view.get(BOOL_KEY) is False and view.get(STRING_KEY) == "Asia/Tokyo"

                provider = PrefdProvider(target, tokens.admin, timeout_s=10)
                await asyncio.to_thread(api.set_provider_and_wait, provider, "bench")
                try:
                    flags = api.get_client("bench")
                    context = EvaluationContext(targeting_key=USER_ID, attributes={"org": ORG_ID})
                    await provider.warm_async(USER_ID, ORG_ID)
                    details = flags.get_boolean_details(BOOL_KEY, True, context)
                    assert (details.value, details.reason) == (False, Reason.TARGETING_MATCH), details
                    assert flags.get_string_value(STRING_KEY, "", context) == "Asia/Tokyo"

                    n = args.evaluations
                    get = view.get
                    samples = {
                        "timer_overhead": _timed(lambda: None, n),
                        "view_get_bool": _timed(lambda: get(BOOL_KEY), n),
                        "view_get_string": _timed(lambda: get(STRING_KEY), n),
                        "provider_resolve_boolean_details": _timed(
                            lambda: provider.resolve_boolean_details(BOOL_KEY, True, context), n
                        ),
                        "provider_resolve_string_details": _timed(
                            lambda: provider.resolve_string_details(STRING_KEY, "", context), n
                        ),
                        "sdk_get_boolean_value": _timed(lambda: flags.get_boolean_value(BOOL_KEY, True, context), n),
                        "sdk_get_boolean_details": _timed(
                            lambda: flags.get_boolean_details(BOOL_KEY, True, context), n
                        ),
                        "sdk_get_string_details": _timed(lambda: flags.get_string_details(STRING_KEY, "", context), n),
                        "sdk_get_boolean_value_async": await _timed_async(
                            lambda: flags.get_boolean_value_async(BOOL_KEY, True, context), n
                        ),
                    }
                    log(f"{n} evaluations of each kind done")
                    assert flags.get_boolean_value(BOOL_KEY, True, context) is False
                finally:
                    await asyncio.to_thread(api.clear_providers)
        finally:
            prefd.stop()
    summaries = {name: summary_us(values) for name, values in samples.items()}

    def ratio(name: str, baseline: str) -> float:
        return round(summaries[name]["median_us"] / summaries[baseline]["median_us"], 1)

    return {
        "benchmark": "OpenFeature evaluation through the SDK and PrefdProvider vs a bare PreferencesView.get",
        "baseline": "view.get of the same key on a live view of the same subject, same process and run",
        "parameters": {"evaluations": args.evaluations, "bool_key": BOOL_KEY, "string_key": STRING_KEY},
        "pinning": pinning.describe(),
        "database": {"mode": db.mode, "name": db.name},
        "timings": summaries,
        "median_ratio_over_view_get": {
            "provider_resolve_boolean_details": ratio("provider_resolve_boolean_details", "view_get_bool"),
            "provider_resolve_string_details": ratio("provider_resolve_string_details", "view_get_string"),
            "sdk_get_boolean_value": ratio("sdk_get_boolean_value", "view_get_bool"),
            "sdk_get_boolean_details": ratio("sdk_get_boolean_details", "view_get_bool"),
            "sdk_get_string_details": ratio("sdk_get_string_details", "view_get_string"),
            "sdk_get_boolean_value_async": ratio("sdk_get_boolean_value_async", "view_get_bool"),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--evaluations", type=int, default=20_000, help="calls of each kind, each timed alone (default 20,000)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin prefd and this process to CPUs")
    args = parser.parse_args()
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-openfeature-")


if __name__ == "__main__":
    sys.exit(main())
