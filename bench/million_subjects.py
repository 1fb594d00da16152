"""Benchmark: GetEffectivePreferences with reads spread over a million subjects, against a bare grpc.aio baseline.

What it measures
    prefd's main read, ``/prefd.v1.PreferencesService/GetEffectivePreferences``, when every call names
    one of --users distinct subjects (default 1,000,000), so prefd's in-process caches (override layers,
    prebuilt responses) can hold only part of them. The baseline is bench/echo_server.py serving the
    same method path with one fixed, real prefd response (captured from the prefd under test): no auth,
    no database, no protobuf work. Both get the same request stream from the same load generator.

    1. uniform: subjects drawn uniformly over all users. prefd req/s over echo req/s (target >= 0.25),
       and prefd's resident set (VmRSS) at the end of each run: at most the cache budget + 150 MB
       (10^6 bytes). The budget is --cache-bytes parsed, else 256 MiB, the server's default.
    2. zipf: subjects drawn from a Zipf distribution with s = 1.1 (rank r with probability proportional
       to 1/r^1.1; ranks map to users through a fixed random permutation, so the hot users are spread
       over the orgs). Target ratio >= 0.50, the same RSS bound. Before its first round prefd alone reads
       Zipf draws for --zipf-warmup seconds (30), so its caches hold the hot set as a long-running
       server's do: 10-second runs read too few of a million subjects for it to settle (the hit ratio
       is reported per run).
    3. batch: --batch-calls serial BatchGetEffectivePreferences calls (service token), each of
       --batch-size (1,000) distinct subjects never read before; p50 and p99 (target p50 <= 100 ms).
    4. eviction wave: a Zipf run of --wave-duration seconds (20) to which, from --wave-start (8 s) for
       --wave-length seconds (4), a second closed loop (--wave-in-flight calls) reading subjects never
       read before is added. Per 1-second window: the Zipf stream's requests and p99, the wave's
       requests, and the hit ratio of prefd's response and layer caches from its /metrics, scraped every
       second (``prefd_cache_lookups_total{cache="responses"|"layers",result="hit"|"miss"}``; null when
       prefd does not export it; prefd's older prefd_cache_hits/misses by layer beside it, and the
       caches' evictions where exported). The Zipf stream's p99 over the run, and "no cliff": every
       window's p99 within 3x of it; its req/s and p99 before, during and after the wave too. The wave's
       subjects are all distinct and never read, but how many it reads in 4 s is bounded by prefd's
       rate of misses: the report estimates how many times over they would fill the cache budget
       (subjects x bytes per cached subject, from prefd's prefd_cache_bytes / prefd_cache_entries, else
       from 5.). To see a wave far larger than the caches, run with a small --cache-bytes (e.g. 2MiB).
    5. memory per cached subject: on the freshly started prefd, after reading --memory-warmup subjects
       spread over every org (so each org's layers are cached), RSS before; then --memory-subjects
       (20,000) distinct subjects of the same org mix, each read once; RSS after. (after - before) / N.
       Beside it, the caches' evictions during those reads and prefd's own bytes per cached subject
       (prefd_cache_bytes / prefd_cache_entries, where exported): once a cache evicts, RSS growth is
       bounded by its budget and no longer what one more subject costs.

    Phases run in the order 5, 3, 1, 2, 4 on one prefd process (5 needs it fresh, 3 and 4 need subjects
    no earlier phase read). In 1 and 2 echo and prefd alternate for --rounds rounds (at least 3; the
    order flips every round), each run a --warmup second unreported warm-up and a --duration second
    window; the report gives every run, the medians, the ratio of medians and each round's own ratio.

Load generator
    This Python process, over grpc.aio: --in-flight concurrent calls (64) spread over --channels
    connections (4), closed loop, on raw bytes (``channel.unary_unary`` without serializers): each
    subject's GetEffectivePreferencesRequest (user_id and org_id set) is serialized once and kept in a
    bounded cache. Subjects come from a seeded RNG; Zipf draws bisect a precomputed cumulative table.
    h2load, which bench/effective_read.py uses, cannot vary the request body per call, so the echo
    baseline here uses this same Python load generator; against echo, this client and the echo server
    each use about one CPU (the report gives both CPU seconds per second of every window). Calls are
    counted by status code. Every 500th prefd response is decoded and checked: values present, and
    every key the load gave the subject's USER, ORG or GLOBAL scope resolved to that value from that
    layer; every 500th echo response must be the captured bytes. The same bearer token (service role)
    goes to both servers.

How the data gets there
    A fresh database; prefd is started once to migrate it and install the shipped definitions. Then,
    inside PostgreSQL (INSERT .. SELECT over generate_series, --load-chunk users per transaction), each
    stored value with version 1 and its change row in the same transaction: user ``mu<n>`` is in org
    ``mo<n mod orgs>``; every tenth user (n mod 10 = 3) holds 1-5 USER overrides (display.theme,
    locale.language, display.items_per_page, ui.tableDensity, notifications.frequency); org m holds
    2 + m mod 5 ORG overrides (locale.timezone, display.theme, ui.rowsPerPage,
    notifications.digest.weekday, display.dashboard_layout, locale.language); GLOBAL holds
    display.dashboard_layout = list and behavior.auto_save = false. Values cycle through ones each
    definition allows. The load is timed. The statistics consumer is kept standing by (this process
    holds its runner lock) so counting the bulk load's change rows does not share prefd's CPU with the
    reads.

Setup
    prefd (one process, DATABASE_URL's PostgreSQL, no Redis unless --redis) and the echo server are
    child processes pinned to the first CPU, this process to the other(s); PostgreSQL is not pinned
    (--no-pin disables pinning). prefd gets PREFD_METRICS_PORT (a free port), and PREFD_CACHE_BYTES only
    when --cache-bytes is given (passed as written, e.g. 256MiB); a server without that setting ignores
    it. One JSON document on stdout; progress on stderr.

Run it (from the repository root; a quick check with --users 100000 --duration 3 --rounds 3):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/million_subjects.py
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import itertools
import json
import os
import random
import re
import statistics
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from harness.auth import Tokens, auth_metadata
from harness.children import HOST, ChildServer, spawn_echo, start_prefd
from harness.cli import add_pin_option, positive_float, positive_int, rounds_arg
from harness.database import fresh_database
from harness.entry import run_main
from harness.machine import loadavg_1m, machine_info
from harness.pinning import Pinning
from harness.procstats import cpu_seconds, read_rss_bytes
from harness.progress import log
from harness.prometheus import free_tcp_port, scrape_counters
from harness.stats import median_or_none, percentile, percentiles_ms, ratio

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.statistics.store import RUNNER_LOCK_KEY

METHOD = "/prefd.v1.PreferencesService/GetEffectivePreferences"
BATCH_METHOD = "/prefd.v1.PreferencesService/BatchGetEffectivePreferences"
CALL_TIMEOUT_S = 30.0
BATCH_TIMEOUT_S = 120.0
MAX_BATCH_SUBJECTS = 1000
# One TCP connection per channel; batch answers (1,000 subjects) exceed gRPC's 4 MiB default.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 256 * 1024 * 1024)]

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024  # prefd's default budget of its in-process caches
RSS_HEADROOM_BYTES = 150 * 1000**2
TARGET_UNIFORM_RATIO = 0.25
TARGET_ZIPF_RATIO = 0.50
TARGET_BATCH_P50_MS = 100.0
CLIFF_FACTOR = 3.0
CHECK_EVERY = 500  # one response in this many is decoded and checked
REQUEST_CACHE_SIZE = 200_000  # serialized requests kept by subject
RSS_SAMPLES = 5
BREAKER_BACKOFF_S = 0.5  # wait after an UNAVAILABLE before the next serial call (prefd probes every 0.25 s)

# The keys the load writes, each with the values it cycles through (all allowed by the shipped definitions).
USER_KEYS: list[tuple[str, list[Any]]] = [
    ("display.theme", ["dark", "light", "system"]),
    ("locale.language", ["en", "fr", "de", "ja", "es", "pt-BR"]),
    ("display.items_per_page", [10, 25, 50, 100, 200]),
    ("ui.tableDensity", ["compact", "comfortable", "spacious"]),
    ("notifications.frequency", ["immediate", "hourly", "daily", "weekly"]),
]
ORG_KEYS: list[tuple[str, list[Any]]] = [
    ("locale.timezone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]),
    ("display.theme", ["system", "dark", "light"]),
    ("ui.rowsPerPage", [10, 25, 50, 100]),
    ("notifications.digest.weekday", ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"]),
    ("display.dashboard_layout", ["grid", "list", "compact"]),
    ("locale.language", ["de", "en", "fr"]),
]
GLOBAL_VALUES: list[tuple[str, Any]] = [("display.dashboard_layout", "list"), ("behavior.auto_save", False)]

# The stored values of `gen` (scope_kind, scope_id, org_id, key, value) and their change rows, in one statement.
WRITE_GENERATED = """,
values_written AS (
    INSERT INTO preference_values (scope_kind, scope_id, key, value, version, updated_by)
    SELECT scope_kind, scope_id, key, value, 1, 'bench-admin' FROM gen)
INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version, actor, reason, org_id)
SELECT 'preference', scope_kind, scope_id, key, NULL, value, 1, 'bench-admin', 'million subjects bench load', org_id
FROM gen"""

# Users $1..$2 in $3 orgs; $4 is USER_KEYS as JSON. User n (n mod 10 = 3) holds the first 1 + (n / 10) mod 5 keys.
USER_LOAD = (
    """WITH gen AS (
    SELECT 'USER' AS scope_kind, 'mu' || n AS scope_id, 'mo' || (n % $3) AS org_id, k.spec ->> 0 AS key,
           k.spec -> 1 -> ((n / 50 + k.rank) % jsonb_array_length(k.spec -> 1))::int AS value
    FROM generate_series($1::bigint, $2::bigint) AS n
    CROSS JOIN LATERAL jsonb_array_elements($4::jsonb) WITH ORDINALITY AS k(spec, rank)
    WHERE n % 10 = 3 AND k.rank <= 1 + (n / 10) % 5)"""
    + WRITE_GENERATED
)

# Orgs 0..$1 - 1; $2 is ORG_KEYS as JSON. Org m holds the first 2 + m mod 5 keys.
ORG_LOAD = (
    """WITH gen AS (
    SELECT 'ORG' AS scope_kind, 'mo' || m AS scope_id, 'mo' || m AS org_id, k.spec ->> 0 AS key,
           k.spec -> 1 -> ((m / 5 + k.rank) % jsonb_array_length(k.spec -> 1))::int AS value
    FROM generate_series(0, $1::bigint - 1) AS m
    CROSS JOIN LATERAL jsonb_array_elements($2::jsonb) WITH ORDINALITY AS k(spec, rank)
    WHERE k.rank <= 2 + m % 5)"""
    + WRITE_GENERATED
)

# $1 is GLOBAL_VALUES as JSON.
GLOBAL_LOAD = (
    """WITH gen AS (
    SELECT 'GLOBAL' AS scope_kind, '' AS scope_id, '' AS org_id, pair ->> 0 AS key, pair -> 1 AS value
    FROM jsonb_array_elements($1::jsonb) AS pair)"""
    + WRITE_GENERATED
)


def user_overrides(user: int) -> dict[str, Any]:
    """The USER overrides USER_LOAD gives user `user`."""
    if user % 10 != 3:
        return {}
    count = 1 + (user // 10) % 5
    return {key: values[(user // 50 + rank) % len(values)] for rank, (key, values) in enumerate(USER_KEYS[:count], 1)}


def org_overrides(org: int) -> dict[str, Any]:
    """The ORG overrides ORG_LOAD gives org `org`."""
    count = 2 + org % 5
    return {key: values[(org // 5 + rank) % len(values)] for rank, (key, values) in enumerate(ORG_KEYS[:count], 1)}


def expected_values(user: int, orgs: int) -> dict[str, tuple[common_pb2.Layer.ValueType, Any]]:
    """Key -> (layer, value) for every key the load gave the user's USER, ORG or GLOBAL scope."""
    found = {key: (common_pb2.LAYER_GLOBAL, value) for key, value in GLOBAL_VALUES}
    found.update((key, (common_pb2.LAYER_ORG, value)) for key, value in org_overrides(user % orgs).items())
    found.update((key, (common_pb2.LAYER_USER, value)) for key, value in user_overrides(user).items())
    return found


def check_values(user: int, orgs: int, values: Any) -> None:
    """Raise unless `values` (EffectiveValue messages) hold what the load gave `user`, from the right layers."""
    if not values:
        raise RuntimeError(f"prefd answered mu{user} with no values")
    by_key = {value.key: value for value in values}
    for key, (layer, expected) in expected_values(user, orgs).items():
        got = by_key.get(key)
        kind = got.value.WhichOneof("kind") if got is not None else None
        if got is None or kind is None or getattr(got.value, kind) != expected or got.provenance.layer != layer:
            raise RuntimeError(
                f"prefd resolved {key} for mu{user} to {got}; expected {expected!r} from {common_pb2.Layer.Name(layer)}"
            )


def check_prefd_body(user: int, orgs: int, body: bytes) -> None:
    """Raise unless `body` is a GetEffectivePreferencesResponse holding what the load gave `user`."""
    check_values(user, orgs, preferences_pb2.GetEffectivePreferencesResponse.FromString(body).values)


def cache_budget_bytes(text: str | None) -> int:
    """The bytes of a size as PREFD_CACHE_BYTES takes it (`268435456`, `256MiB`, `1GB`); the default when None."""
    if text is None:
        return DEFAULT_CACHE_BYTES
    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*", text, re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size (bytes, or with KB, KiB, MB, MiB, GB, GiB)")
    unit = (match.group(2) or "b").lower()
    scale = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}[unit]
    return int(match.group(1)) * scale


async def load_data(dsn: str, users: int, orgs: int, chunk: int) -> dict[str, Any]:
    """Generate every override and its change row inside PostgreSQL; what was loaded, and how long it took."""
    conn = await asyncpg.connect(dsn)
    started = time.monotonic()
    try:
        async with conn.transaction():
            await conn.execute(GLOBAL_LOAD, json.dumps(GLOBAL_VALUES))
            await conn.execute(ORG_LOAD, orgs, json.dumps(ORG_KEYS))
        for first in range(0, users, chunk):
            await conn.execute(USER_LOAD, first, min(users, first + chunk) - 1, orgs, json.dumps(USER_KEYS))
            if (first // chunk) % 5 == 4:
                log(f"loaded {min(users, first + chunk):,} / {users:,} users")
        load_s = time.monotonic() - started
        await conn.execute("ANALYZE preference_values")
        await conn.execute("ANALYZE changes")
        rows = dict(await conn.fetch("SELECT scope_kind, count(*) FROM preference_values GROUP BY scope_kind"))
        holders = await conn.fetchval(
            "SELECT count(DISTINCT scope_id) FROM preference_values WHERE scope_kind = 'USER'"
        )
        changes = await conn.fetchval("SELECT count(*) FROM changes WHERE kind = 'preference'")
    finally:
        await conn.close()
    return {
        "users": users,
        "orgs": orgs,
        "users_with_overrides": holders,
        "stored_values": {"USER": rows.get("USER", 0), "ORG": rows.get("ORG", 0), "GLOBAL": rows.get("GLOBAL", 0)},
        "change_rows": changes,
        "load_s": round(load_s, 1),
        "load_chunk_users": chunk,
    }


@functools.lru_cache(maxsize=REQUEST_CACHE_SIZE)
def request_bytes(user: int, orgs: int) -> bytes:
    """The serialized GetEffectivePreferencesRequest for user `user` in its org."""
    subject = common_pb2.Subject(user_id=f"mu{user}", org_id=f"mo{user % orgs}")
    return preferences_pb2.GetEffectivePreferencesRequest(subject=subject).SerializeToString()


class Population:
    """The users reads are drawn from: uniformly, by Zipf rank, or never drawn before.

    Every draw marks its user as read, so `fresh` draws are subjects no earlier call named.
    """

    def __init__(self, users: int, orgs: int, zipf_s: float, seed: int) -> None:
        self.users = users
        self.orgs = orgs
        rng = random.Random(seed)
        self._rank_to_user = array("l", range(users))
        rng.shuffle(self._rank_to_user)  # hot ranks land on users of every org
        self._cumulative = array("d", itertools.accumulate(r**-zipf_s for r in range(1, users + 1)))
        self._seen = bytearray(users)
        self.seen_count = 0

    def _mark(self, user: int) -> int:
        if not self._seen[user]:
            self._seen[user] = 1
            self.seen_count += 1
        return user

    def uniform(self, rng: random.Random) -> Callable[[], int]:
        """Draws of any user, each equally likely."""
        users = self.users
        return lambda: self._mark(rng.randrange(users))

    def zipf(self, rng: random.Random) -> Callable[[], int]:
        """Draws of the user at Zipf rank r, with probability proportional to 1 / r^s."""
        cumulative, rank_to_user = self._cumulative, self._rank_to_user
        total, last = cumulative[-1], self.users - 1

        def draw() -> int:
            return self._mark(rank_to_user[min(bisect.bisect_right(cumulative, rng.random() * total), last)])

        return draw

    def fresh(self, rng: random.Random, org: int | None = None) -> int:
        """A user no earlier draw returned (in org `org` when given); RuntimeError when none is left."""
        per_org = (self.users - org + self.orgs - 1) // self.orgs if org is not None else 0
        for _ in range(10_000):
            user = rng.randrange(self.users) if org is None else org + self.orgs * rng.randrange(per_org)
            if not self._seen[user]:
                return self._mark(user)
        raise RuntimeError(f"no unread subject left among {self.users:,} users; run with more --users")

    def fresh_draws(self, rng: random.Random) -> Callable[[], int]:
        """Draws of users never drawn before."""
        return lambda: self.fresh(rng)


@dataclass
class ReadLoad:
    """What one closed-loop read window did."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    ended_ns: list[int] = field(default_factory=list)
    checked: int = 0
    elapsed_s: float = 0.0

    @property
    def req_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0


Call = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]  # raw bytes in, raw bytes out
Check = Callable[[int, bytes], None]  # (user, response body): raises unless the answer is right


def until(deadline: float, draw: Callable[[], int]) -> Callable[[], int | None]:
    """`draw`'s subjects until `deadline` (monotonic seconds), then None."""
    return lambda: draw() if time.monotonic() < deadline else None


def first(count: int, draw: Callable[[], int]) -> Callable[[], int | None]:
    """`draw`'s first `count` subjects, then None."""
    taken = itertools.count()
    return lambda: draw() if next(taken) < count else None


async def read_loop(
    call: Call, subjects: Callable[[], int | None], orgs: int, metadata: Any, load: ReadLoad, check: Check
) -> None:
    """Read one subject per call until `subjects` returns None."""
    while (user := subjects()) is not None:
        request = request_bytes(user, orgs)
        started = time.monotonic_ns()
        try:
            body = await call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            load.errors[exc.code().name] += 1
            continue
        ended = time.monotonic_ns()
        load.latencies_ns.append(ended - started)
        load.ended_ns.append(ended)
        load.ok += 1
        if load.ok % CHECK_EVERY == 1:
            check(user, body)
            load.checked += 1


async def run_reads(
    calls: list[Call], subjects: Callable[[], int | None], orgs: int, metadata: Any, in_flight: int, check: Check
) -> ReadLoad:
    """`in_flight` read loops over `calls` until `subjects` runs out; waits for every call started."""
    load = ReadLoad()
    started = time.monotonic()
    await asyncio.gather(
        *(read_loop(calls[i % len(calls)], subjects, orgs, metadata, load, check) for i in range(in_flight))
    )
    load.elapsed_s = time.monotonic() - started
    return load


@dataclass
class Server:
    """One server under load: its child process, the channels to it, and how its answers are checked."""

    name: str
    child: ChildServer
    channels: list[grpc.aio.Channel]
    check: Check
    calls: list[Call] = field(init=False)

    def __post_init__(self) -> None:
        # No (de)serializers: bytes in, bytes out.
        self.calls = [channel.unary_unary(METHOD) for channel in self.channels]

    @property
    def pid(self) -> int:
        assert self.child.proc is not None
        return self.child.proc.pid

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def connect(port: int, count: int) -> list[grpc.aio.Channel]:
    """`count` channels to HOST:port, each its own TCP connection."""
    return [grpc.aio.insecure_channel(f"{HOST}:{port}", options=CHANNEL_OPTIONS) for _ in range(count)]


def rss(pid: int) -> int:
    """VmRSS of `pid` in bytes."""
    return read_rss_bytes(pid)["VmRSS"]


async def steady_rss(pid: int, settle_s: float = 1.0) -> int:
    """The median of RSS_SAMPLES VmRSS readings 0.2 s apart, after `settle_s` seconds idle."""
    await asyncio.sleep(settle_s)
    samples = []
    for _ in range(RSS_SAMPLES):
        samples.append(rss(pid))
        await asyncio.sleep(0.2)
    return int(statistics.median(samples))


# --- prefd's cache counters ----------------------------------------------------------------------

LOOKUPS = "prefd_cache_lookups_total"
# Per-cache figures besides lookups, by metric name (labelled by cache).
CACHE_FIGURES = {
    "prefd_cache_evictions_total": "evictions",
    "prefd_cache_bytes": "bytes",
    "prefd_cache_budget_bytes": "budget_bytes",
    "prefd_cache_entries": "entries",
}
# The label values a cache may carry; the first one prefd exports is used.
CACHE_LABELS = {"responses": ("responses", "preferences.responses"), "layers": ("layers", "preferences.layers")}
# The counters prefd exported before prefd_cache_lookups_total: hits and misses by layer.
LAYER_COUNTERS = {"prefd_cache_hits_total": "hit", "prefd_cache_misses_total": "miss"}
LEGACY_LAYERS = ("response", "l1")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Caches = dict[str, dict[str, float]]  # cache -> figure ("hit", "miss", "evictions", ...) -> value


async def scrape_caches(metrics_port: int) -> Caches:
    """The response and layer caches' figures from prefd's /metrics: "responses" and "layers" (hit and miss
    from prefd_cache_lookups_total, and evictions, bytes, budget_bytes, entries where exported), and
    "legacy_response" and "legacy_l1" (hit and miss from prefd_cache_hits/prefd_cache_misses by layer);
    a cache prefd does not export is absent ({} when the endpoint does not answer)."""
    try:
        samples = await scrape_counters(metrics_port, "prefd_cache_")
    except OSError:
        return {}
    by_label: dict[str, dict[str, float]] = {}
    legacy: dict[str, dict[str, float]] = {}
    for sample, value in samples.items():
        name, _, labels_text = sample.partition("{")
        labels = dict(_LABEL.findall(labels_text))
        if name == LOOKUPS:
            by_label.setdefault(labels.get("cache", ""), {})[labels.get("result", "")] = value
        elif name in CACHE_FIGURES:
            by_label.setdefault(labels.get("cache", ""), {})[CACHE_FIGURES[name]] = value
        elif name in LAYER_COUNTERS:
            legacy.setdefault(labels.get("layer", ""), {})[LAYER_COUNTERS[name]] = value
    found: Caches = {}
    for cache, names in CACHE_LABELS.items():
        label = next((n for n in names if "hit" in by_label.get(n, {})), None)
        if label is not None:
            found[cache] = by_label[label]
    for layer in LEGACY_LAYERS:
        if "hit" in legacy.get(layer, {}):
            found[f"legacy_{layer}"] = legacy[layer]
    return found


def hit_ratios(before: Caches, after: Caches) -> dict[str, float | None]:
    """Hits / lookups between two scrapes per cache (None when not exported or nothing was looked up)."""
    found: dict[str, float | None] = {}
    for cache in (*CACHE_LABELS, *(f"legacy_{layer}" for layer in LEGACY_LAYERS)):
        if cache not in before or cache not in after:
            found[cache] = None
            continue
        hits = after[cache]["hit"] - before[cache]["hit"]
        misses = after[cache].get("miss", 0.0) - before[cache].get("miss", 0.0)
        found[cache] = ratio(hits, hits + misses)
    return found


def evictions(before: Caches, after: Caches) -> dict[str, float | None]:
    """Entries the response and layer caches evicted between two scrapes (None when not exported)."""
    return {
        cache: after[cache]["evictions"] - before[cache]["evictions"]
        if "evictions" in before.get(cache, {}) and "evictions" in after.get(cache, {})
        else None
        for cache in CACHE_LABELS
    }


def fill(caches: Caches) -> dict[str, dict[str, float | None]]:
    """Bytes, budget and entries of the response and layer caches (None when not exported)."""
    return {
        cache: {figure: caches.get(cache, {}).get(figure) for figure in ("bytes", "budget_bytes", "entries")}
        for cache in CACHE_LABELS
    }


def subject_bytes(caches: Caches) -> float | None:
    """prefd's own estimate of one subject's cached bytes: a mean response plus a mean layer (None when not
    exported or empty)."""
    total = 0.0
    for cache in CACHE_LABELS:
        figures = caches.get(cache, {})
        if not figures.get("entries") or "bytes" not in figures:
            return None
        total += figures["bytes"] / figures["entries"]
    return total


# --- phases --------------------------------------------------------------------------------------


class Bench:
    """One run's population, servers, token and settings."""

    def __init__(self, args: argparse.Namespace, population: Population, metrics_port: int, token: str) -> None:
        self.args = args
        self.population = population
        self.metrics_port = metrics_port
        self.metadata = auth_metadata(token)
        self.seed = args.seed

    def rng(self, label: str) -> random.Random:
        """A random source of its own for each stream, seeded from --seed."""
        return random.Random(f"{self.seed}:{label}")

    async def reads(self, server: Server, subjects: Callable[[], int | None], in_flight: int) -> ReadLoad:
        """Closed-loop reads of `subjects` on `server`, `in_flight` calls at a time."""
        return await run_reads(server.calls, subjects, self.population.orgs, self.metadata, in_flight, server.check)

    async def memory_phase(self, prefd: Server) -> dict[str, Any]:
        """RSS growth per subject read once, after a warm-up over every org, on a freshly started prefd."""
        population, args = self.population, self.args
        rng = self.rng("memory")
        orgs = population.orgs

        def spread() -> Callable[[], int]:
            picks = itertools.count()
            return lambda: population.fresh(rng, next(picks) % orgs)

        warmup = max(args.memory_warmup, orgs)
        log(f"memory: warm-up of {warmup:,} subjects over {orgs:,} orgs")
        warm = await self.reads(prefd, first(warmup, spread()), args.in_flight)
        before = await steady_rss(prefd.pid)
        caches_before = await scrape_caches(self.metrics_port)
        log(f"memory: RSS {before / 2**20:.1f} MiB; reading {args.memory_subjects:,} new subjects once")
        load = await self.reads(prefd, first(args.memory_subjects, spread()), args.in_flight)
        after = await steady_rss(prefd.pid)
        caches_after = await scrape_caches(self.metrics_port)
        per_subject = (after - before) / load.ok if load.ok else None
        per_entry = subject_bytes(caches_after)
        log(f"memory: RSS {after / 2**20:.1f} MiB, {per_subject or 0:,.0f} bytes per subject")
        return {
            "warmup_subjects": warm.ok,
            "subjects": load.ok,
            "errors": dict(warm.errors + load.errors),
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "bytes_per_subject": None if per_subject is None else round(per_subject),
            "read_req_per_s": round(load.req_per_s, 1),
            "cache_evictions_during": evictions(caches_before, caches_after),
            "caches_after": fill(caches_after),
            "cached_bytes_per_subject_by_prefd": None if per_entry is None else round(per_entry),
            "how": f"VmRSS median of {RSS_SAMPLES} readings 0.2 s apart after 1 s idle, before and after; subject i "
            "is a never-read user of org i mod orgs, in the warm-up and the measured reads alike; when a cache "
            "evicted during the reads, the growth is bounded by its budget rather than by what a subject costs "
            "(prefd's own estimate: a mean cached response plus a mean cached layer)",
        }

    def draws(self, mode: str) -> Callable[[random.Random], Callable[[], int]]:
        """The subject distribution of a mode: "uniform" or "zipf"."""
        return {"uniform": self.population.uniform, "zipf": self.population.zipf}[mode]

    async def measured_run(self, mode: str, round_no: int, server: Server) -> dict[str, Any]:
        """A warm-up, then one --duration window of closed-loop reads on `server`; its figures.

        Both servers of a round get the same stream of subjects (one seed per mode and round).
        """
        args = self.args
        draw = self.draws(mode)(self.rng(f"{mode}-{round_no}"))
        load_before = loadavg_1m()
        await self.reads(server, until(time.monotonic() + args.warmup, draw), args.in_flight)
        counters_before = await scrape_caches(self.metrics_port) if server.name == "prefd" else {}
        client_cpu, server_cpu = cpu_seconds(os.getpid()), cpu_seconds(server.pid)
        load = await self.reads(server, until(time.monotonic() + args.duration, draw), args.in_flight)
        client_cpu, server_cpu = cpu_seconds(os.getpid()) - client_cpu, cpu_seconds(server.pid) - server_cpu
        record: dict[str, Any] = {
            "round": round_no,
            "server": server.name,
            "req_per_s": round(load.req_per_s, 1),
            "successful_calls": load.ok,
            "failed_calls": dict(load.errors),
            "latency_ms": percentiles_ms(load.latencies_ns),
            "responses_checked": load.checked,
            "server_cpu_s_per_s": round(server_cpu / load.elapsed_s, 3),
            "server_cpu_us_per_call": round(server_cpu * 1e6 / load.ok, 1) if load.ok else None,
            "client_cpu_s_per_s": round(client_cpu / load.elapsed_s, 3),
            "loadavg_1m_before": load_before,
        }
        if server.name == "prefd":
            record["prefd_rss_bytes"] = rss(server.pid)
            record["cache_hit_ratio"] = hit_ratios(counters_before, await scrape_caches(self.metrics_port))
        log(
            f"{mode} round {round_no}/{args.rounds} {server.name}: {load.req_per_s:,.0f} req/s, "
            f"p99 {record['latency_ms']['p99']} ms, errors {dict(load.errors)}"
            + (f", RSS {record['prefd_rss_bytes'] / 2**20:.0f} MiB" if server.name == "prefd" else "")
        )
        return record

    async def compare(self, mode: str, echo: Server, prefd: Server, target_ratio: float, budget: int) -> dict[str, Any]:
        """Alternating echo and prefd runs of one subject distribution; medians, ratios, RSS bound.

        Before the first Zipf round prefd alone reads Zipf draws for --zipf-warmup seconds, so its caches
        hold the hot subjects as a long-running server's do (a few 10-second runs read too few subjects of
        a million for the hot set to settle); the echo server has no cache to warm."""
        if mode == "zipf" and self.args.zipf_warmup > 0:
            log(f"zipf: prefd reads Zipf draws for {self.args.zipf_warmup:g} s first (its caches settle)")
            draw = self.draws(mode)(self.rng("zipf-settle"))
            await self.reads(prefd, until(time.monotonic() + self.args.zipf_warmup, draw), self.args.in_flight)
        runs = []
        for round_no in range(1, self.args.rounds + 1):
            for server in (echo, prefd) if round_no % 2 else (prefd, echo):
                runs.append(await self.measured_run(mode, round_no, server))
        medians = {
            name: median_or_none([r["req_per_s"] for r in runs if r["server"] == name]) for name in ("echo", "prefd")
        }
        paired = [
            ratio(
                next(r["req_per_s"] for r in runs if r["round"] == n and r["server"] == "prefd"),
                next(r["req_per_s"] for r in runs if r["round"] == n and r["server"] == "echo"),
            )
            for n in range(1, self.args.rounds + 1)
        ]
        prefd_over_echo = ratio(medians["prefd"], medians["echo"])
        rss_max = max(r["prefd_rss_bytes"] for r in runs if r["server"] == "prefd")
        bound = budget + RSS_HEADROOM_BYTES
        return {
            "runs": runs,
            "median_req_per_s": medians,
            "median_latency_ms_p99": {
                name: median_or_none([r["latency_ms"]["p99"] for r in runs if r["server"] == name])
                for name in ("echo", "prefd")
            },
            "ratio_prefd_over_echo": prefd_over_echo,
            "paired_round_ratios": paired,
            "median_paired_ratio": median_or_none(paired),
            "prefd_rss_max_bytes": rss_max,
            "prefd_rss_bound_bytes": bound,
            "verdicts": {
                "ratio": {
                    "target": f">= {target_ratio}",
                    "value": prefd_over_echo,
                    "met": prefd_over_echo is not None and prefd_over_echo >= target_ratio,
                },
                "rss": {"target": "<= cache budget + 150 MB", "value": rss_max, "met": rss_max <= bound},
            },
        }

    async def batch_phase(self, prefd: Server) -> dict[str, Any]:
        """Serial BatchGetEffectivePreferences calls, each of --batch-size subjects never read before."""
        args, population = self.args, self.population
        rng = self.rng("batch")
        call: Call = prefd.channels[0].unary_unary(BATCH_METHOD)

        def batch() -> tuple[list[int], bytes]:
            users = [population.fresh(rng) for _ in range(args.batch_size)]
            subjects = [common_pb2.Subject(user_id=f"mu{u}", org_id=f"mo{u % population.orgs}") for u in users]
            return users, preferences_pb2.BatchGetEffectivePreferencesRequest(subjects=subjects).SerializeToString()

        samples: list[int] = []
        errors: Counter[str] = Counter()
        response_bytes = 0
        for number in range(args.batch_calls + 1):  # the first is an unreported warm-up
            users, request = batch()
            started = time.monotonic_ns()
            try:
                body = await call(request, metadata=self.metadata, timeout=BATCH_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                await asyncio.sleep(BREAKER_BACKOFF_S)  # a serial client backs off before its next call
                continue
            elapsed = time.monotonic_ns() - started
            response = preferences_pb2.BatchGetEffectivePreferencesResponse.FromString(body)
            if [r.subject.user_id for r in response.results] != [f"mu{u}" for u in users]:
                raise RuntimeError("a batch answer does not name the requested subjects in order")
            for user, result in zip(users, response.results, strict=True):
                check_values(user, population.orgs, result.values)
            if number:
                samples.append(elapsed)
                response_bytes = len(body)
        latency = percentiles_ms(samples)
        log(f"batch: p50 {latency['p50']} ms, p99 {latency['p99']} ms over {len(samples)} calls, errors {dict(errors)}")
        p50 = latency["p50"]
        return {
            "calls": len(samples),
            "subjects_per_call": args.batch_size,
            "failed_calls": dict(errors),
            "latency_ms": latency,
            "response_bytes": response_bytes,
            "how": "serial calls with a service token after one unreported call; every subject of every call is a "
            "user no earlier call named; timed until the answer's bytes arrived, each answer then decoded and every "
            f"subject's loaded overrides checked; after a failed call the next waits {BREAKER_BACKOFF_S} s",
            "verdict": {
                "target": f"p50 <= {TARGET_BATCH_P50_MS:g} ms, every call answered",
                "value": p50,
                "met": p50 is not None and p50 <= TARGET_BATCH_P50_MS and not errors,
            },
        }

    async def wave_phase(self, prefd: Server, budget: int, bytes_per_subject: int | None) -> dict[str, Any]:
        """A Zipf run with a wave of never-read subjects added mid-way; per-second figures and the cliff check."""
        args, population = self.args, self.population
        zipf = population.zipf(self.rng("wave-zipf"))
        unread = population.fresh_draws(self.rng("wave-unread"))
        await self.reads(prefd, until(time.monotonic() + args.warmup, zipf), args.in_flight)
        scrapes: list[Caches] = []
        wave_start, wave_end = args.wave_start, args.wave_start + args.wave_length
        log(
            f"wave: {args.wave_duration} s of Zipf reads, never-read subjects added from {wave_start} s to {wave_end} s"
        )
        started, started_ns = time.monotonic(), time.monotonic_ns()

        async def scrape_every_second() -> None:
            for second in range(args.wave_duration + 1):
                await asyncio.sleep(max(0.0, started + second - time.monotonic()))
                scrapes.append(await scrape_caches(self.metrics_port))

        async def wave() -> ReadLoad:
            await asyncio.sleep(max(0.0, started + wave_start - time.monotonic()))
            return await self.reads(prefd, until(started + wave_end, unread), args.wave_in_flight)

        hot, added, _ = await asyncio.gather(
            self.reads(prefd, until(started + args.wave_duration, zipf), args.in_flight),
            wave(),
            scrape_every_second(),
        )
        hot_windows = per_second(hot, started_ns, args.wave_duration)
        wave_windows = per_second(added, started_ns, args.wave_duration)
        overall = percentiles_ms(hot.latencies_ns)
        windows = []
        for second in range(args.wave_duration):
            p99 = p99_ms(hot_windows[second])
            windows.append(
                {
                    "second": second,
                    "wave": wave_start <= second < wave_end,
                    "requests": len(hot_windows[second]),
                    "p99_ms": p99,
                    "wave_requests": len(wave_windows[second]),
                    "wave_p99_ms": p99_ms(wave_windows[second]),
                    "hit_ratio": hit_ratios(scrapes[second], scrapes[second + 1]),
                    "evictions": evictions(scrapes[second], scrapes[second + 1]),
                    "within_3x_of_overall_p99": p99 is not None and p99 <= CLIFF_FACTOR * (overall["p99"] or 0),
                }
            )
        no_cliff = all(w["within_3x_of_overall_p99"] for w in windows)
        parts = {
            "before_wave": hot_windows[:wave_start],
            "during_wave": hot_windows[wave_start:wave_end],
            "after_wave": hot_windows[wave_end:],
        }
        per_subject, source = subject_bytes(scrapes[-1]), "prefd_cache_bytes / prefd_cache_entries, responses + layers"
        if per_subject is None:
            per_subject, source = bytes_per_subject, "RSS growth per subject in the memory phase"
        estimated = round(added.ok * per_subject) if per_subject else None
        log(
            f"wave: overall p99 {overall['p99']} ms, window p99s {[w['p99_ms'] for w in windows]}, "
            f"{added.ok:,} never-read subjects added; no cliff: {no_cliff}"
        )
        return {
            "parameters": {
                "duration_s": args.wave_duration,
                "wave_from_s": wave_start,
                "wave_to_s": wave_end,
                "zipf_in_flight": args.in_flight,
                "wave_in_flight": args.wave_in_flight,
            },
            "zipf_stream": {
                "successful_calls": hot.ok,
                "failed_calls": dict(hot.errors),
                "req_per_s": round(hot.req_per_s, 1),
                "latency_ms": overall,
                "by_part": {
                    part: {
                        "req_per_s": round(sum(map(len, seconds)) / len(seconds), 1) if seconds else None,
                        "p99_ms": p99_ms(list(itertools.chain(*seconds))),
                    }
                    for part, seconds in parts.items()
                },
            },
            "wave_stream": {
                "distinct_never_read_subjects": added.ok,
                "failed_calls": dict(added.errors),
                "latency_ms": percentiles_ms(added.latencies_ns),
                "estimated_bytes": estimated,
                "estimated_times_cache_budget": ratio(estimated, budget, 2),
                "estimate": f"subjects read x bytes per cached subject ({source})",
            },
            "hit_ratio": {
                "before_wave": hit_ratios(scrapes[0], scrapes[wave_start]),
                "during_wave": hit_ratios(scrapes[wave_start], scrapes[wave_end]),
                "after_wave": hit_ratios(scrapes[wave_end], scrapes[-1]),
                "source": f"{LOOKUPS} (responses, layers; null: not exported), and the older prefd_cache_hits/"
                "prefd_cache_misses by layer (legacy_response, legacy_l1)",
            },
            "evictions": {
                "before_wave": evictions(scrapes[0], scrapes[wave_start]),
                "during_wave": evictions(scrapes[wave_start], scrapes[wave_end]),
                "after_wave": evictions(scrapes[wave_end], scrapes[-1]),
            },
            "caches_after_wave": fill(scrapes[-1]),
            "windows": windows,
            "prefd_rss_bytes_after": rss(prefd.pid),
            "verdict": {
                "target": "every 1-second window's p99 of the Zipf stream <= 3x its p99 over the run (no cliff)",
                "value": round(max((w["p99_ms"] or 0) / overall["p99"] for w in windows), 3)
                if overall["p99"]
                else None,
                "met": no_cliff,
            },
        }


def per_second(load: ReadLoad, started_ns: int, seconds: int) -> list[list[int]]:
    """The load's latencies by the second (since `started_ns`) their call ended in; late ones in the last."""
    windows: list[list[int]] = [[] for _ in range(seconds)]
    for ended, latency in zip(load.ended_ns, load.latencies_ns, strict=True):
        windows[min(max(0, (ended - started_ns) // 1_000_000_000), seconds - 1)].append(latency)
    return windows


def p99_ms(latencies_ns: list[int]) -> float | None:
    """The 99th percentile in milliseconds (None without samples)."""
    return round(percentile(sorted(latencies_ns), 99) / 1e6, 3) if latencies_ns else None


async def capture_response(
    prefd: Server, population: Population, rng: random.Random, metadata: Any
) -> tuple[int, bytes]:
    """(user, prefd's answer) for a never-read user holding USER overrides: the echo server's fixed answer.

    UNAVAILABLE (prefd's database breaker open after a missed health check) is retried for up to 30 s.
    """
    user = population.fresh(rng)
    while not user_overrides(user):
        user = population.fresh(rng)
    deadline = time.monotonic() + 30.0
    while True:
        try:
            body: bytes = await prefd.calls[0](
                request_bytes(user, population.orgs), metadata=metadata, timeout=CALL_TIMEOUT_S
            )
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(BREAKER_BACKOFF_S)
    check_prefd_body(user, population.orgs, body)
    return user, body


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Load the data, start prefd and echo, run every phase, tear down; the JSON report."""
    machine = machine_info()
    pinning = Pinning.choose(args.pin)
    tokens = Tokens.new()
    budget = cache_budget_bytes(args.cache_bytes)
    log(f"drawing the Zipf table and rank permutation over {args.users:,} users")
    population = Population(args.users, args.orgs, args.zipf_s, args.seed)
    async with fresh_database() as db:
        pinning.apply_to_self()  # after the (possibly embedded) database started: it stays unpinned
        migrate = await start_prefd(db, tokens, work_dir / "migrate", pinning.server)  # migrations + definitions
        migrate.stop()
        log(f"loading {args.users:,} users in {args.orgs:,} orgs")
        loaded = await load_data(db.dsn, args.users, args.orgs, args.load_chunk)
        log(f"loaded {loaded['stored_values']} values in {loaded['load_s']} s")

        runner_lock = await asyncpg.connect(db.dsn)
        try:
            # The statistics consumer stands by: counting the bulk load is not what this measures.
            if not await runner_lock.fetchval("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK_KEY):
                raise RuntimeError("the statistics runner lock is held by someone else")
            metrics_port = free_tcp_port()
            env = {"PREFD_METRICS_PORT": str(metrics_port), "PREFD_METRICS_HOST": HOST}
            if args.cache_bytes is not None:
                env["PREFD_CACHE_BYTES"] = args.cache_bytes
            if args.redis:
                env["REDIS_URL"] = args.redis
            bench = Bench(args, population, metrics_port, tokens.service)
            prefd_child = await start_prefd(db, tokens, work_dir / "prefd", pinning.server, env)
            servers: list[Server] = []
            echo_child: ChildServer | None = None
            try:
                prefd = Server(
                    "prefd",
                    prefd_child,
                    connect(prefd_child.port, args.channels),
                    lambda user, body: check_prefd_body(user, args.orgs, body),
                )
                servers.append(prefd)
                rss_started = await steady_rss(prefd.pid)
                memory = await bench.memory_phase(prefd)
                batch = await bench.batch_phase(prefd)

                user, captured = await capture_response(prefd, population, bench.rng("echo"), bench.metadata)
                response_file = work_dir / "response.bin"
                response_file.write_bytes(captured)
                echo_child = spawn_echo(work_dir, pinning.server, response_file, METHOD)
                echo_port = await echo_child.wait_ready()

                def check_echo(user: int, body: bytes) -> None:
                    if body != captured:
                        raise RuntimeError("the echo server did not return the captured response")

                echo = Server("echo", echo_child, connect(echo_port, args.channels), check_echo)
                servers.append(echo)
                check_echo(user, await echo.calls[0](request_bytes(user, args.orgs), metadata=bench.metadata))

                uniform = await bench.compare("uniform", echo, prefd, TARGET_UNIFORM_RATIO, budget)
                zipf = await bench.compare("zipf", echo, prefd, TARGET_ZIPF_RATIO, budget)
                wave = await bench.wave_phase(prefd, budget, memory["bytes_per_subject"])
            finally:
                for server in servers:
                    await server.close()
                exit_codes = {"echo": echo_child.stop() if echo_child else None, "prefd": prefd_child.stop()}
        finally:
            await runner_lock.close()

    prefd_failures = Counter[str]()
    for phase in (uniform, zipf):
        for r in phase["runs"]:
            if r["server"] == "prefd":
                prefd_failures.update(r["failed_calls"])
    prefd_failures.update(memory["errors"])
    prefd_failures.update(batch["failed_calls"])
    prefd_failures.update(wave["zipf_stream"]["failed_calls"])
    prefd_failures.update(wave["wave_stream"]["failed_calls"])
    return {
        "benchmark": "GetEffectivePreferences over a million subjects: prefd vs a bare grpc.aio baseline, "
        "prefd's memory, batch reads and an eviction wave",
        "method": METHOD,
        "baseline": "echo: bench/echo_server.py (plain grpc.aio.server(), generic handler, returns one real prefd "
        "response captured in this run; no auth, no database), loaded by the same Python load generator",
        "machine": machine,
        "pinning": pinning.describe(),
        "database": db.describe(),
        "data": {
            **loaded,
            "how": "generated inside PostgreSQL (INSERT .. SELECT over generate_series), each stored value with its "
            "change row (version 1) in the same transaction; the statistics consumer stands by (runner lock held)",
            "user_keys": [key for key, _ in USER_KEYS],
            "org_keys": [key for key, _ in ORG_KEYS],
            "global_values": dict(GLOBAL_VALUES),
        },
        "prefd_settings": {
            "PREFD_CACHE_BYTES": args.cache_bytes if args.cache_bytes is not None else "unset (server default)",
            "cache_budget_bytes": budget,
            "PREFD_METRICS_PORT": "set (a free port)",
            "redis": args.redis or "none",
            "rss_after_start_bytes": rss_started,
        },
        "parameters": {
            "in_flight": args.in_flight,
            "channels": args.channels,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "zipf_warmup_s": args.zipf_warmup,
            "rounds": args.rounds,
            "order": "per round echo then prefd in odd rounds, prefd then echo in even ones; uniform rounds, then Zipf",
            "zipf_s": args.zipf_s,
            "seed": args.seed,
            "token": "service role, sent to both servers",
            "phase_order": "memory (fresh prefd), batch, uniform, zipf, eviction wave; one prefd process",
        },
        "payload": {"echo_response_bytes": len(captured), "echo_response_subject": f"mu{user}"},
        "correctness": {
            "prefd_failed_calls": dict(prefd_failures),
            "every_prefd_call_succeeded": not prefd_failures,
            "checked": f"one response in {CHECK_EVERY} per run (values present; every loaded override of the "
            "subject's USER, ORG and GLOBAL scopes resolved from its layer); every batch subject",
        },
        "uniform": uniform,
        "zipf": zipf,
        "batch": batch,
        "eviction_wave": wave,
        "memory_per_subject": memory,
        "targets": {
            "uniform_ratio": uniform["verdicts"]["ratio"],
            "uniform_rss": uniform["verdicts"]["rss"],
            "zipf_ratio": zipf["verdicts"]["ratio"],
            "zipf_rss": zipf["verdicts"]["rss"],
            "batch_p50": batch["verdict"],
            "wave_no_cliff": wave["verdict"],
        },
        "server_exit_codes": exit_codes,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated."""
    parser = argparse.ArgumentParser(
        description="prefd GetEffectivePreferences over a million subjects vs a bare grpc.aio echo server."
    )
    parser.add_argument("--users", type=positive_int, default=1_000_000, help="users (default 1,000,000)")
    parser.add_argument("--orgs", type=positive_int, default=1000, help="orgs; user n is in org n mod orgs (1000)")
    parser.add_argument("--load-chunk", type=positive_int, default=100_000, help="users per load transaction")
    parser.add_argument("--duration", type=positive_float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unreported seconds before each run (default 2)")
    parser.add_argument(
        "--zipf-warmup",
        type=float,
        default=30.0,
        help="unreported seconds of Zipf reads on prefd before the Zipf rounds, so its caches settle (default 30)",
    )
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds, at least 3 (default 3)")
    parser.add_argument("--in-flight", type=positive_int, default=64, help="concurrent calls (default 64)")
    parser.add_argument("--channels", type=positive_int, default=4, help="client connections per server (default 4)")
    parser.add_argument("--zipf-s", type=positive_float, default=1.1, help="the Zipf exponent s (default 1.1)")
    parser.add_argument(
        "--cache-bytes",
        help="PREFD_CACHE_BYTES, passed as written (e.g. 256MiB); unset by default (the server's default, 256 MiB)",
    )
    parser.add_argument(
        "--redis",
        nargs="?",
        const=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="give prefd Redis: this URL, else REDIS_URL, else redis://127.0.0.1:6379/0 (default: no Redis)",
    )
    parser.add_argument("--batch-calls", type=positive_int, default=20, help="measured batch calls (default 20)")
    parser.add_argument("--batch-size", type=positive_int, default=MAX_BATCH_SUBJECTS, help="subjects per batch call")
    parser.add_argument("--memory-subjects", type=positive_int, default=20_000, help="subjects read once (20,000)")
    parser.add_argument(
        "--memory-warmup", type=positive_int, default=2000, help="subjects read before (at least one per org)"
    )
    parser.add_argument("--wave-duration", type=positive_int, default=20, help="seconds of the wave run (default 20)")
    parser.add_argument("--wave-start", type=int, default=8, help="second the wave starts (default 8)")
    parser.add_argument("--wave-length", type=positive_int, default=4, help="seconds the wave lasts (default 4)")
    parser.add_argument("--wave-in-flight", type=positive_int, default=64, help="the wave's concurrent calls (64)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the subject draws and permutation (default 1)")
    add_pin_option(
        parser, "pin the servers to the first CPU and this process to the rest (default on; needs >= 2 CPUs)"
    )
    args = parser.parse_args(argv)
    try:
        cache_budget_bytes(args.cache_bytes)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--cache-bytes: {exc}")
    if args.batch_size > MAX_BATCH_SUBJECTS:
        parser.error(f"--batch-size: at most {MAX_BATCH_SUBJECTS} subjects per call")
    if not 0 <= args.wave_start or args.wave_start + args.wave_length > args.wave_duration:
        parser.error("the wave must lie within the run: 0 <= --wave-start, --wave-start + --wave-length <= duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_main(lambda work_dir: run(args, work_dir), "prefd-bench-million-")


if __name__ == "__main__":
    raise SystemExit(main())
