"""The Prometheus endpoint: RPC metrics (rpc_metrics.py) plus figures read from the live feed
reader, caches and pool at scrape time (no hot-path cost)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from prefd_server.kernel.bounded_cache import CacheBudget
from prefd_server.kernel.db import pool_stats
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.parts import CacheFigures
from prefd_server.kernel.redis import RedisLayers


class PrefdCollector(Collector):
    """Feed lag and position, open watch streams, cache hits and misses per layer, the database pool,
    Redis errors."""

    def __init__(
        self,
        feed: FeedReader,
        cache: CacheFigures,
        pool: asyncpg.Pool,
        redis: RedisLayers | None,
        caches: CacheBudget | None = None,
    ) -> None:
        self._feed = feed
        self._cache = cache
        self._caches = caches
        self._pool = pool
        self._redis = redis

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "prefd_feed_lag_seconds",
            "Time from the newest dispatched change's transaction to its dispatch by this process",
            value=self._feed.lag_ms / 1000,
        )
        yield GaugeMetricFamily(
            "prefd_feed_seconds_since_read",
            "Time since this process's feed reader last caught up with the change table",
            value=time.monotonic() - self._feed.last_read_monotonic,
        )
        held = self._feed.held_since
        yield GaugeMetricFamily(
            "prefd_feed_horizon_held_seconds",
            "Age of the oldest committed change waiting behind the feed horizon (a transaction open anywhere in "
            "the PostgreSQL cluster holds it back from every watcher); 0 when none waits",
            value=max(0.0, time.time() - held.timestamp()) if held is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "prefd_watch_streams", "Open watch streams (WatchPreferences and WatchAIConfig)", value=self._feed.watchers
        )
        hits = CounterMetricFamily("prefd_cache_hits", "Cache hits by layer", labels=["layer"])
        misses = CounterMetricFamily("prefd_cache_misses", "Cache misses by layer", labels=["layer"])
        hit_counts, miss_counts = self._cache.by_layer()
        for layer, count in hit_counts.items():
            hits.add_metric([layer], count)
        for layer, count in miss_counts.items():
            misses.add_metric([layer], count)
        yield hits
        yield misses
        if self._caches is not None:
            yield from _bounded_caches(self._caches)
        pool = pool_stats(self._pool)
        connections = GaugeMetricFamily("prefd_db_pool_connections", "Pool connections by state", labels=["state"])
        connections.add_metric(["in_use"], pool.in_use)
        connections.add_metric(["idle"], pool.idle)
        yield connections
        yield GaugeMetricFamily("prefd_db_pool_waiting", "Callers waiting for a pool connection", value=pool.waiting)
        yield GaugeMetricFamily("prefd_db_pool_max", "The pool's upper bound", value=pool.max_size)
        if self._redis is not None:
            yield CounterMetricFamily("prefd_redis_errors", "Failed Redis operations", value=self._redis.errors)


def _bounded_caches(caches: CacheBudget) -> Iterator[Any]:
    """Each in-process cache's bytes, budget, entries, lookups by result and evictions."""
    label = ["cache"]
    used = GaugeMetricFamily("prefd_cache_bytes", "Bytes an in-process cache holds (estimated)", labels=label)
    budget = GaugeMetricFamily(
        "prefd_cache_budget_bytes", "An in-process cache's share of PREFD_CACHE_BYTES", labels=label
    )
    entries = GaugeMetricFamily("prefd_cache_entries", "Entries an in-process cache holds", labels=label)
    lookups = CounterMetricFamily(
        "prefd_cache_lookups", "Lookups of an in-process cache by result (hit, miss)", labels=["cache", "result"]
    )
    evictions = CounterMetricFamily("prefd_cache_evictions", "Entries evicted to stay within budget", labels=label)
    for f in caches.figures():
        used.add_metric([f.name], f.bytes)
        budget.add_metric([f.name], f.budget_bytes)
        entries.add_metric([f.name], f.entries)
        lookups.add_metric([f.name, "hit"], f.hits)
        lookups.add_metric([f.name, "miss"], f.misses)
        evictions.add_metric([f.name], f.evictions)
    yield from (used, budget, entries, lookups, evictions)


def start_metrics_endpoint(
    registry: CollectorRegistry,
    port: int,
    host: str,
    feed: FeedReader,
    cache: CacheFigures,
    pool: asyncpg.Pool,
    redis: RedisLayers | None,
    caches: CacheBudget | None = None,
) -> Any:
    """Start the /metrics HTTP endpoint on its own port; returns the HTTP server (call shutdown())."""
    registry.register(PrefdCollector(feed, cache, pool, redis, caches))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
