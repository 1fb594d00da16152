"""Caches bounded in bytes: the budget holds after every put, what is read again survives a scan of
entries read once, eviction takes one entry at a time, and the budget setting accepts sizes only."""

from __future__ import annotations

import gc
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefd_server.kernel.bounded_cache import SHARES, CacheBudget, SegmentedLru, parse_size
from prefd_server.kernel.model import Scope, ScopeKind, scope_key
from prefd_server.kernel.scoped_cache import Layer, ScopedCache
from prefd_server.settings import Settings
from tests.helpers.settings import process_env


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get", "put", "pop"]), st.integers(0, 40), st.integers(1, 300))))
def test_the_budget_holds_after_every_operation_and_the_figures_add_up(operations: list[tuple[str, int, int]]) -> None:
    evicted: list[int] = []
    cache: SegmentedLru[int, int] = SegmentedLru("t", 1000, lambda key, value: evicted.append(key))
    model: dict[int, int] = {}
    for op, key, cost in operations:
        if op == "put":
            kept = cache.put(key, cost, cost)
            assert kept == (cost <= 1000)
            model[key] = cost
        elif op == "get":
            assert cache.get(key) in (None, model.get(key))
        else:
            cache.pop(key)
            model.pop(key, None)
        assert cache.bytes <= 1000
        assert cache.bytes == sum(cache.peek(k) or 0 for k in cache.keys())
        for gone in evicted:
            model.pop(gone, None)
        evicted.clear()
    assert cache.evictions + len(cache) <= sum(1 for op, _, _ in operations if op == "put")


def test_entries_read_again_survive_a_scan_of_entries_read_once() -> None:
    cache: SegmentedLru[str, bytes] = SegmentedLru("t", 100 * 100)
    hot = [f"hot{n}" for n in range(50)]
    for key in hot:
        cache.put(key, b"", 100)
        cache.get(key)  # read again: protected
    for n in range(10_000):  # a scan 100 times the budget: each entry missed once, then stored
        assert cache.get(f"cold{n}") is None
        cache.put(f"cold{n}", b"", 100)
        assert cache.bytes <= 100 * 100
    assert all(key in cache for key in hot)
    assert cache.evictions > 9_000


def test_eviction_under_zipf_reads_keeps_the_hit_ratio_of_the_hot_set_and_never_clears_at_once() -> None:
    rng = random.Random(7)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(100_000)]
    cache: SegmentedLru[int, bytes] = SegmentedLru("t", 2_000 * 100)
    hits = 0
    sizes = []
    for key in rng.choices(range(100_000), weights, k=60_000):
        if cache.get(key) is None:
            cache.put(key, b"", 100)
        else:
            hits += 1
        sizes.append(len(cache))
    assert hits / 60_000 > 0.45  # the 2,000 most read of 100,000 keys take about half the reads
    # Eviction removes entries one at a time: the cache stays full once it is.
    full_from = sizes.index(2_000)
    assert min(sizes[full_from:]) >= 1_999


def test_a_value_larger_than_the_budget_is_not_kept_and_evicts_nothing() -> None:
    cache: SegmentedLru[str, int] = SegmentedLru("t", 500)
    cache.put("a", 1, 400)
    assert not cache.put("b", 2, 501)
    assert cache.get("a") == 1 and cache.get("b") is None and cache.evictions == 0


def test_shares_of_the_budget_add_up_to_at_most_the_whole() -> None:
    budget = CacheBudget(256 * 1024 * 1024)
    assert sum(budget.bytes_for(name) for name in SHARES) <= budget.total_bytes
    made = budget.cache("preferences.layers")
    made.put("k", "v", 10)
    (figures,) = budget.figures()
    assert (figures.name, figures.bytes, figures.entries) == ("preferences.layers", 10, 1)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("268435456", 268435456), ("256MiB", 256 * 1024**2), ("1 GB", 10**9), ("64kib", 64 * 1024)],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert Settings(cache_bytes=text).cache_bytes == size


@pytest.mark.parametrize("text", ["0", "-5", "0MiB", "lots", "1.5GB", "12 parsecs", ""])
def test_a_budget_that_is_not_a_positive_size_refuses_to_start_naming_the_setting(text: str) -> None:
    env = process_env("postgresql://nobody@127.0.0.1:1/none", PREFD_CACHE_BYTES=text)
    done = subprocess.run(
        [sys.executable, "-m", "prefd_server", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "PREFD_CACHE_BYTES" in done.stderr, done.stderr


def test_a_cached_layer_without_overrides_is_nothing_the_garbage_collector_tracks() -> None:
    cache: ScopedCache[dict[str, int]] = ScopedCache(None, _no_reads, name="preferences", empty={})  # type: ignore[arg-type]
    scope = Scope(ScopeKind.USER, "u1")
    cache._loaded(scope, Layer({}, 7), cache=True)
    gc.collect()
    assert not any(gc.is_tracked(o) for o in gc.get_referrers(scope_key(scope)) if isinstance(o, tuple))
    assert not gc.is_tracked(cache._layers.peek(scope_key(scope)))


async def _no_reads(conn: object, scopes: object) -> dict[Scope, dict[str, int]]:
    raise AssertionError("nothing is read")
