"""Caching of effective configuration: L1 in-process over L2 Redis over PostgreSQL.

L1 holds the definitions, each scope's override layer and prebuilt response bodies; L2 holds
scope layers shared by replicas. Every cached layer remembers the snapshot horizon (xmin) it
was read at; the local feed reader (and local commits) record each scope's newest change xid,
and a layer read before that change is never cached or served. Losing Redis loses nothing:
PostgreSQL stays the source of truth.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.kernel.db import snapshot
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, Subject
from prefd_server.kernel.redis import RedisLayers as RedisLayers  # re-exported until callers import the kernel
from prefd_server.kernel.response_cache import ResponseCache
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.model import Definition, ResolvedValue, StoredValue
from prefd_server.preferences.resolve import key_selected, resolve

# How long a processed change keeps vetoing layers read before it (longer than any read takes).
CHANGE_MEMORY_S = 120.0


@dataclass(frozen=True, slots=True)
class CachedLayer:
    """The live overrides of one scope as of a snapshot whose horizon was `xmin`."""

    overrides: dict[str, StoredValue]
    xmin: int


class CacheStats:
    """Hit and miss counts per layer (l1, l2) and of prebuilt responses (plain ints on the hot path)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {"l1": 0, "l2": 0}
        self.misses: dict[str, int] = {"l1": 0, "l2": 0}
        self.response_hits = 0
        self.response_misses = 0

    def by_layer(self) -> tuple[dict[str, int], dict[str, int]]:
        """(hits, misses) by layer name, responses included."""
        return (
            {**self.hits, "response": self.response_hits},
            {**self.misses, "response": self.response_misses},
        )


def _encode_layer(layer: CachedLayer) -> bytes:
    return json.dumps(
        {
            "xmin": layer.xmin,
            "values": {
                k: [v.value, v.version, v.updated_at.isoformat(), v.updated_by] for k, v in layer.overrides.items()
            },
        },
        separators=(",", ":"),
    ).encode()


def _decode_layer(scope: Scope, blob: bytes | str) -> CachedLayer:
    doc = json.loads(blob)
    overrides = {
        key: StoredValue(scope, key, value, version, datetime.fromisoformat(at), by)
        for key, (value, version, at, by) in doc["values"].items()
    }
    return CachedLayer(overrides, doc["xmin"])


class EffectiveCache:
    """Resolves subjects from cached definitions and layers; keeps prebuilt response bodies."""

    def __init__(self, pool: asyncpg.Pool, redis: RedisLayers | None) -> None:
        self._pool = pool
        self.redis = redis
        self.stats = CacheStats()
        self._definitions: list[Definition] | None = None
        self._definitions_by_key: dict[str, Definition] = {}
        self._definitions_loading: asyncio.Future[list[Definition]] | None = None
        self._loading: dict[Scope, asyncio.Future[dict[Scope, CachedLayer]]] = {}
        self._definitions_changed_xid = 0
        self._layers: dict[Scope, CachedLayer] = {}
        # Newest snapshot horizon this process has used per scope (and when), so it never goes back.
        self._floor: dict[Scope, tuple[int, float]] = {}
        self._prune_changed_at = 1024
        self._prune_floor_at = 1024
        self._changed: dict[Scope, tuple[int, int, float]] = {}  # scope -> (xid, tick, monotonic)
        self._definitions_tick = 0
        self._tick = 0
        self._responses = ResponseCache()
        self._background: set[asyncio.Task[None]] = set()

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: forget everything the changes make stale."""
        scopes = set()
        for event in events:
            if event.kind == ChangeKind.ERASURE:  # names only a pseudonym: forget every layer
                self.forget_all_layers(event.xid)
            elif event.kind == ChangeKind.DEFINITION:
                self._forget_definitions(event.xid)
            elif event.kind == ChangeKind.PREFERENCE:
                scopes.add(event.scope)
                self._forget_scope(event.scope, event.xid)
        if scopes and self.redis is not None:
            self._spawn(self.redis.delete(scopes))
        self._prune()

    def on_local_commit(self, scope: Scope, xid: int, redis_delete: bool = True) -> None:
        """A write of this process committed: its own reads see it at once."""
        self._forget_scope(scope, xid)
        if redis_delete and self.redis is not None:
            self._spawn(self.redis.delete([scope]))

    def forget_all_layers(self, xid: int) -> None:
        """Drop every cached layer and response (after an erasure, whose change row hides the user id)."""
        for scope in list(self._layers):
            self._forget_scope(scope, xid)
        self._responses.clear()

    def on_local_definition_commit(self, xid: int) -> None:
        self._forget_definitions(xid)

    def _forget_scope(self, scope: Scope, xid: int) -> None:
        self._tick += 1
        previous = self._changed.get(scope)
        self._changed[scope] = (max(xid, previous[0] if previous else 0), self._tick, time.monotonic())
        self._layers.pop(scope, None)
        self._loading.pop(scope, None)  # a load begun before this change must not serve later readers
        self._responses.drop(scope)

    def _forget_definitions(self, xid: int) -> None:
        self._tick += 1
        self._definitions = None
        self._definitions_changed_xid = max(self._definitions_changed_xid, xid)
        self._definitions_tick = self._tick
        self._responses.clear()

    def _prune(self) -> None:
        """Forget per-scope marks older than CHANGE_MEMORY_S, amortised: only when a map has doubled."""
        cutoff = time.monotonic() - CHANGE_MEMORY_S
        if len(self._changed) > self._prune_changed_at:
            self._changed = {s: v for s, v in self._changed.items() if v[2] >= cutoff}
            self._prune_changed_at = max(1024, 2 * len(self._changed))
        if len(self._floor) > self._prune_floor_at:
            self._floor = {s: v for s, v in self._floor.items() if v[1] >= cutoff}
            self._prune_floor_at = max(1024, 2 * len(self._floor))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _layer_fresh(self, scope: Scope, layer: CachedLayer) -> bool:
        changed = self._changed.get(scope)
        return changed is None or layer.xmin > changed[0]

    # --- reads -----------------------------------------------------------------------------

    @property
    def tick(self) -> int:
        """Grows with every invalidation; compare before and after building a response."""
        return self._tick

    def response(self, key: Hashable) -> bytes | None:
        """A prebuilt response body, if one is cached for `key`."""
        body = self._responses.get(key)
        if body is None:
            self.stats.response_misses += 1
        else:
            self.stats.response_hits += 1
        return body

    def store_response(self, key: Hashable, used: dict[Scope, int], since_tick: int, body: bytes) -> None:
        """Keep a response body built from layers read at `used` (scope -> xmin) since `since_tick`,
        unless a change was seen after `since_tick` or a newer layer of one of its scopes was read."""
        scopes = list(used)
        if self._definitions_tick > since_tick:
            return
        for scope, xmin in used.items():
            changed = self._changed.get(scope)
            if changed is not None and changed[1] > since_tick:
                return
            floor = self._floor.get(scope)
            if floor is not None and xmin < floor[0]:
                return
        self._responses.put(key, body, scopes)

    async def definitions(self) -> list[Definition]:
        """Every definition, ordered by key (one load at a time however many callers miss)."""
        if self._definitions is not None:
            return self._definitions
        if self._definitions_loading is None:
            self._definitions_loading = asyncio.ensure_future(self._load_definitions())
            self._definitions_loading.add_done_callback(self._definitions_loaded)
        return await asyncio.shield(self._definitions_loading)

    def _definitions_loaded(self, future: asyncio.Future[list[Definition]]) -> None:
        self._definitions_loading = None
        if not future.cancelled():
            future.exception()  # retrieved here; each waiter still sees it

    async def _load_definitions(self) -> list[Definition]:
        async with snapshot(self._pool) as snap:
            xmin = snap.xmin
            loaded = await definition_sql.all_definitions(snap.conn)
        if xmin > self._definitions_changed_xid:
            self._definitions = loaded
            self._definitions_by_key = {d.key: d for d in loaded}
        return loaded

    async def definition(self, key: str) -> Definition | None:
        """One definition from the cached set."""
        if self._definitions is None:
            found = {d.key: d for d in await self.definitions()}
            return found.get(key)
        return self._definitions_by_key.get(key)

    async def layers(self, scopes: Sequence[Scope]) -> dict[Scope, CachedLayer]:
        """The override layer of each scope: L1, else L2, else PostgreSQL (one snapshot for all).

        Concurrent misses of the same scope share one load.
        """
        found: dict[Scope, CachedLayer] = {}
        missing = []
        for scope in scopes:
            layer = self._layers.get(scope)
            if layer is not None:
                found[scope] = layer
            else:
                missing.append(scope)
        self.stats.hits["l1"] += len(found)
        self.stats.misses["l1"] += len(missing)
        if not missing:
            return found
        joined = {s: self._loading[s] for s in missing if s in self._loading}
        mine = [s for s in missing if s not in joined]
        if mine:
            load: asyncio.Future[dict[Scope, CachedLayer]] = asyncio.ensure_future(self._load_layers(mine))
            for scope in mine:
                self._loading[scope] = load
            load.add_done_callback(functools.partial(self._layers_loaded, scopes=tuple(mine)))
            joined.update(dict.fromkeys(mine, load))
        for pending in set(joined.values()):
            loaded = await asyncio.shield(pending)
            found.update({s: layer for s, layer in loaded.items() if joined.get(s) is pending})
        return found

    def _layers_loaded(self, load: asyncio.Future[dict[Scope, CachedLayer]], scopes: tuple[Scope, ...]) -> None:
        for scope in scopes:
            if self._loading.get(scope) is load:
                del self._loading[scope]
        if not load.cancelled():
            load.exception()  # retrieved here; each waiter still sees it

    async def _load_layers(self, missing: list[Scope]) -> dict[Scope, CachedLayer]:
        found: dict[Scope, CachedLayer] = {}
        if self.redis is not None:
            from_redis = {
                s: layer
                for s, layer in (
                    (s, _decode_layer(s, blob)) for s, blob in (await self.redis.get_many(missing)).items()
                )
                if self._layer_fresh(s, layer) and layer.xmin >= self._floor.get(s, (0, 0.0))[0]
            }
            self.stats.hits["l2"] += len(from_redis)
            self.stats.misses["l2"] += len(missing) - len(from_redis)
            for scope, layer in from_redis.items():
                self._loaded(scope, layer, cache=True)
            found.update(from_redis)
            missing = [s for s in missing if s not in from_redis]
            if not missing:
                return found
        async with snapshot(self._pool) as snap:
            xmin = snap.xmin
            stored = await preference_sql.overrides(snap.conn, missing)
        loaded = {scope: CachedLayer(stored[scope], xmin) for scope in missing}
        fresh = {s: layer for s, layer in loaded.items() if self._layer_fresh(s, layer)}
        for scope, layer in loaded.items():
            self._loaded(scope, layer, cache=scope in fresh)
        if fresh and self.redis is not None:
            self._spawn(self.redis.set_many({s: _encode_layer(layer) for s, layer in fresh.items()}))
        found.update(loaded)
        return found

    def _loaded(self, scope: Scope, layer: CachedLayer, cache: bool) -> None:
        """A layer just read may hold changes the feed has not delivered yet: responses built from older
        layers of the scope must not be served after it, and an older layer never replaces a newer one."""
        self._floor[scope] = (max(self._floor.get(scope, (0, 0.0))[0], layer.xmin), time.monotonic())
        self._responses.drop(scope)
        current = self._layers.get(scope)
        if cache and (current is None or current.xmin <= layer.xmin):
            self._layers[scope] = layer
        self._prune()

    async def resolve(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[list[ResolvedValue]]:
        """Each subject's effective values from cached definitions and layers."""
        definitions = [d for d in await self.definitions() if key_selected(d, key_prefixes, categories)]
        layers = await self.layers(preference_sql.subject_scopes(subjects))
        return [
            resolve(definitions, [(layer, scope, layers[scope].overrides) for layer, scope in subject.layers()])
            for subject in subjects
        ]

    async def resolve_subject(
        self, subject: Subject, key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> tuple[list[ResolvedValue], dict[Scope, int]]:
        """One subject's effective values, and the horizon (xmin) of each layer they came from."""
        definitions = [d for d in await self.definitions() if key_selected(d, key_prefixes, categories)]
        layers = await self.layers([scope for _, scope in subject.layers()])
        values = resolve(definitions, [(layer, scope, layers[scope].overrides) for layer, scope in subject.layers()])
        return values, {scope: layer.xmin for scope, layer in layers.items()}

    async def resolve_key(self, subject: Subject, key: str) -> ResolvedValue | None:
        """The subject's effective value of one key; None if the key is not defined."""
        definition = await self.definition(key)
        if definition is None:
            return None
        layers = await self.layers([scope for _, scope in subject.layers()])
        resolved = resolve([definition], [(layer, scope, layers[scope].overrides) for layer, scope in subject.layers()])
        return resolved[0]

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.redis is not None:
            await self.redis.close()
