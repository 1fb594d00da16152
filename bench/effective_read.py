"""Benchmark: prefd's GetEffectivePreferences against a bare grpc.aio baseline.

What it measures
    The cost prefd adds on top of grpc.aio for its main read,
    ``/prefd.v1.PreferencesService/GetEffectivePreferences`` for one subject (about 86 resolved
    keys with provenance), compared with bench/echo_server.py, which serves the same method path
    with a fixed, prebuilt copy of a real prefd response: no auth, no database, no protobuf work.

    * serial latency: N sequential unary calls from a Python grpc.aio client (after a warm-up);
      p50/p90/p99 in microseconds.
    * throughput: h2load (-D seconds, -c clients, -m streams per client) posting a gRPC-framed
      request. h2load only sees HTTP status (gRPC errors are HTTP 200 too), so correctness is
      checked separately: one real gRPC call to each server must return the expected values; one
      fixed-count h2load run (-n clients*streams) per server must receive exactly one full response
      message per request; and every timed run must have received at least that many bytes.

    Both measurements run for echo then prefd, alternating, for --rounds rounds (at least 3);
    the report gives every round, the medians, and the prefd/echo ratios of median req/s and of
    median p50 latency.

Setup
    A fresh database ``prefd_bench_<random>`` (harness.database: on DATABASE_URL's server, else on an
    embedded PostgreSQL started in a temporary directory), dropped at the end. prefd and the echo
    server run as child processes. On a machine with at least
    two CPUs both servers are pinned to the first CPU and the load generators (this process and
    h2load) to the others; PostgreSQL is left unpinned (--no-pin disables all pinning). Before
    measuring, an admin token writes an ORG override (a 50/50 rollout of display.theme, so every
    response built buckets the subject) and a USER override for the benchmark subject.

Harness
    The read is a ReadTarget (method, request, seed writes, response checks) handed to
    harness.echo_comparison.main(), which bench/ai_effective_read.py runs with its own target.

Output
    One JSON document on stdout; progress on stderr. Child logs go to a temporary directory,
    removed at the end (kept, and named on stderr, when the run fails).

Run it (from the repository root; the venv has grpcio, asyncpg and prefd installed):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/effective_read.py --duration 10 --clients 50 --streams 10 --serial 500
"""

from __future__ import annotations

from typing import Any

import grpc
from harness.auth import auth_metadata
from harness.children import HOST
from harness.echo_comparison import SUBJECT, ReadTarget, main

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.preferences.rollout import bucket

METHOD = "/prefd.v1.PreferencesService/GetEffectivePreferences"


# The ORG override of display.theme is a rollout (half dark, half system, by user): the subject's
# variant is worked out with flagd's fractional v2 on every response built.
THEME_ROLLOUT = common_pb2.Rollout(
    variants=[
        common_pb2.RolloutVariant(name=name, value=common_pb2.TypedValue(string_value=name), weight=50)
        for name in ("dark", "system")
    ],
    salt="bench-theme",
)
THEME = "dark" if bucket("bench-theme", SUBJECT.user_id, 100) < 50 else "system"


async def seed_overrides(port: int, admin_token: str) -> None:
    """Write an ORG rollout and a USER override for the benchmark subject, so resolution crosses layers."""
    writes = [
        (
            common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=SUBJECT.org_id),
            preferences_pb2.PreferenceWrite(key="display.theme", rollout=THEME_ROLLOUT),
        ),
        (
            common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=SUBJECT.user_id),
            preferences_pb2.PreferenceWrite(key="display.items_per_page", value=common_pb2.TypedValue(int_value=50)),
        ),
    ]
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        for scope, write in writes:
            request = preferences_pb2.SetPreferencesRequest(scope=scope, writes=[write], reason="benchmark setup")
            await stub.SetPreferences(request, metadata=auth_metadata(admin_token), timeout=30)


def check_prefd_response(response: preferences_pb2.GetEffectivePreferencesResponse) -> dict[str, Any]:
    """Fail unless the response holds values and both seeded overrides, from the right layers."""
    by_key = {value.key: value for value in response.values}
    theme = by_key.get("display.theme")
    per_page = by_key.get("display.items_per_page")
    problems = []
    if not response.values:
        problems.append("no values")
    if (
        theme is None
        or theme.value.string_value != THEME
        or theme.provenance.layer != common_pb2.LAYER_ORG
        or theme.provenance.rollout.variant != THEME
    ):
        problems.append(f"display.theme is not {THEME!r} from the ORG layer's rollout: {theme}")
    if per_page is None or per_page.value.int_value != 50 or per_page.provenance.layer != common_pb2.LAYER_USER:
        problems.append(f"display.items_per_page is not 50 from the USER layer: {per_page}")
    if problems:
        raise RuntimeError("prefd returned an unexpected GetEffectivePreferences response: " + "; ".join(problems))
    return {
        "values": len(response.values),
        "display.theme": f"{THEME} (LAYER_ORG, rollout variant {THEME})",
        "display.items_per_page": "50 (LAYER_USER)",
    }


PREFERENCES = ReadTarget(
    benchmark="GetEffectivePreferences: prefd vs a bare grpc.aio baseline",
    description="Benchmark prefd GetEffectivePreferences against a bare grpc.aio echo server.",
    method=METHOD,
    request=preferences_pb2.GetEffectivePreferencesRequest(subject=SUBJECT),
    response_type=preferences_pb2.GetEffectivePreferencesResponse,
    seed=seed_overrides,
    check=check_prefd_response,
    payload=lambda response: {"response_values": len(response.values)},
    answered=lambda response: bool(response.values),
    empty_answer="no values",
)


if __name__ == "__main__":
    raise SystemExit(main(PREFERENCES))
