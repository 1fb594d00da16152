"""A per-scope read cache kept fresh by change xids: L1 in process, optional Redis L2, snapshot horizons.

Every cached layer remembers the snapshot horizon (xmin) it was read at. Changes (from the feed
reader and from this process's commits) record each scope's newest change xid: a layer read
before that change is never cached, a load begun before it serves no later reader, an older read
never replaces a newer one, and a prebuilt response is dropped when a scope it was built from
changes or is read anew. A value read for everyone (definitions, a model catalog) follows the same
rules as a SnapshotValue. PostgreSQL stays the source of truth: losing Redis loses nothing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from prefd_server.kernel.db import snapshot
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope
from prefd_server.kernel.redis import RedisLayers
from prefd_server.kernel.response_cache import ResponseCache

T = TypeVar("T")
V = TypeVar("V")

# How long a processed change keeps vetoing layers read before it (longer than any read takes).
CHANGE_MEMORY_S = 120.0
# Change marks and floors are pruned only once their map has doubled past this size.
_PRUNE_AT_LEAST = 1024


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


@dataclass(frozen=True, slots=True)
class Layer(Generic[T]):
    """What one scope held as of a snapshot whose horizon was `xmin`."""

    value: T
    xmin: int


@dataclass(frozen=True, slots=True)
class LayerCodec(Generic[T]):
    """How a layer's value is written to Redis: to a JSON-able document and back."""

    encode: Callable[[T], object]
    decode: Callable[[Scope, Any], T]


class SnapshotValue(Generic[V]):
    """One value read for everyone at a snapshot horizon (definitions, a model catalog).

    A change drops it; a read older than the newest change still answers its own callers but is
    never kept, and a load begun before a change serves no later caller. Concurrent misses share one load.
    """

    def __init__(
        self, pool: asyncpg.Pool, read: Callable[[asyncpg.Connection], Awaitable[V]], changed: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._read = read
        self._changed = changed
        self._changed_xid = 0
        self._loading: asyncio.Future[V] | None = None
        self.value: V | None = None  # the kept value, None until read or after a change

    def forget(self, xid: int) -> None:
        """The value changed in transaction `xid`."""
        self.value = None
        self._changed_xid = max(self._changed_xid, xid)
        self._loading = None
        self._changed()

    async def get(self) -> V:
        """The kept value, else one snapshot read of it."""
        if self.value is not None:
            return self.value
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
            self._loading.add_done_callback(self._loaded)
        return await asyncio.shield(self._loading)

    def _loaded(self, load: asyncio.Future[V]) -> None:
        if self._loading is load:
            self._loading = None
        if not load.cancelled():
            load.exception()  # retrieved here; each waiter still sees it

    async def _load(self) -> V:
        async with snapshot(self._pool) as snap:
            xmin = snap.xmin
            loaded = await self._read(snap.conn)
        if xmin > self._changed_xid:
            self.value = loaded
        return loaded


class ScopedCache(Generic[T]):
    """Each scope's layer from L1, else Redis, else one PostgreSQL snapshot; and prebuilt responses."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        read: Callable[[asyncpg.Connection, Sequence[Scope]], Awaitable[Mapping[Scope, T]]],
        redis: RedisLayers | None = None,
        codec: LayerCodec[T] | None = None,
        max_layers: int | None = None,
    ) -> None:
        if redis is not None and codec is None:
            raise ValueError("a Redis layer cache needs a codec")
        self._pool = pool
        self._read = read
        self.redis = redis
        self._codec = codec
        self._max_layers = max_layers
        self.stats = CacheStats()
        self._layers: dict[Scope, Layer[T]] = {}
        self._loading: dict[Scope, asyncio.Future[dict[Scope, Layer[T]]]] = {}
        self._changed: dict[Scope, tuple[int, int, float]] = {}  # scope -> (xid, tick, monotonic)
        # Newest snapshot horizon this process has used per scope (and when), so it never goes back.
        self._floor: dict[Scope, tuple[int, float]] = {}
        self._prune_changed_at = _PRUNE_AT_LEAST
        self._prune_floor_at = _PRUNE_AT_LEAST
        self._tick = 0
        self._global_tick = 0
        self._responses: ResponseCache[bytes] = ResponseCache()
        self._background: set[asyncio.Task[None]] = set()

    def snapshot_value(self, read: Callable[[asyncpg.Connection], Awaitable[V]]) -> SnapshotValue[V]:
        """A value every response depends on: its change drops every response."""
        return SnapshotValue(self._pool, read, self._global_changed)

    # --- invalidation ------------------------------------------------------------------

    def on_changes(
        self, events: Sequence[ChangeEvent], kind: ChangeKind, values: Mapping[ChangeKind, SnapshotValue[Any]]
    ) -> None:
        """Feed listener: forget the scopes changes of `kind` name, every scope on an erasure (its change
        names only a pseudonym), and each of `values` whose kind changed."""
        scopes = set()
        for event in events:
            if event.kind == ChangeKind.ERASURE:
                self.forget_all(event.xid)
            elif event.kind == kind:
                scopes.add(event.scope)
                self._forget(event.scope, event.xid)
            elif event.kind in values:
                values[event.kind].forget(event.xid)
        if scopes and self.redis is not None:
            self._spawn(self.redis.delete(scopes))
        self._prune()

    def forget(self, scope: Scope, xid: int, redis_delete: bool = True) -> None:
        """`scope` changed in transaction `xid` (a commit of this process: its own reads see it at once)."""
        self._forget(scope, xid)
        if redis_delete and self.redis is not None:
            self._spawn(self.redis.delete([scope]))

    def forget_all(self, xid: int) -> None:
        """Drop every cached layer and response, as if each cached scope changed in `xid`."""
        for scope in list(self._layers):
            self._forget(scope, xid)
        self._responses.clear()

    def _forget(self, scope: Scope, xid: int) -> None:
        self._tick += 1
        previous = self._changed.get(scope)
        self._changed[scope] = (max(xid, previous[0] if previous else 0), self._tick, time.monotonic())
        self._layers.pop(scope, None)
        self._loading.pop(scope, None)  # a load begun before this change must not serve later readers
        self._responses.drop(scope)

    def _global_changed(self) -> None:
        self._tick += 1
        self._global_tick = self._tick
        self._responses.clear()

    def _prune(self) -> None:
        """Forget marks and floors older than CHANGE_MEMORY_S, amortised: only when a map has doubled."""
        cutoff = time.monotonic() - CHANGE_MEMORY_S
        if len(self._changed) > self._prune_changed_at:
            self._changed = {s: v for s, v in self._changed.items() if v[2] >= cutoff}
            self._prune_changed_at = max(_PRUNE_AT_LEAST, 2 * len(self._changed))
        if len(self._floor) > self._prune_floor_at:
            self._floor = {s: v for s, v in self._floor.items() if v[1] >= cutoff}
            self._prune_floor_at = max(_PRUNE_AT_LEAST, 2 * len(self._floor))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fresh(self, scope: Scope, xmin: int) -> bool:
        changed = self._changed.get(scope)
        return changed is None or xmin > changed[0]

    # --- responses ---------------------------------------------------------------------

    @property
    def tick(self) -> int:
        """Grows with every invalidation; compare before and after building a response."""
        return self._tick

    def changed_since(self, scopes: Iterable[Scope], tick: int) -> bool:
        """Whether any of `scopes` (or a snapshot value) was invalidated after `tick`."""
        if self._global_tick > tick:
            return True
        for scope in scopes:
            changed = self._changed.get(scope)
            if changed is not None and changed[1] > tick:
                return True
        return False

    def response(self, key: Hashable) -> bytes | None:
        """A prebuilt response body, if one is cached for `key`."""
        body = self._responses.get(key)
        if body is None:
            self.stats.response_misses += 1
        else:
            self.stats.response_hits += 1
        return body

    def store_response(self, key: Hashable, used: Mapping[Scope, int], since_tick: int, body: bytes) -> None:
        """Keep a response body built from layers read at `used` (scope -> xmin) since `since_tick`,
        unless a change was seen after `since_tick` or a newer layer of one of its scopes was read."""
        if self.changed_since(used, since_tick):
            return
        for scope, xmin in used.items():
            floor = self._floor.get(scope)
            if floor is not None and xmin < floor[0]:
                return
        self._responses.put(key, body, used)

    # --- reads -------------------------------------------------------------------------

    async def layers(self, scopes: Sequence[Scope]) -> dict[Scope, Layer[T]]:
        """The layer of each scope: L1, else L2, else PostgreSQL (one snapshot for all).

        Concurrent misses of the same scope share one load.
        """
        found: dict[Scope, Layer[T]] = {}
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
            load: asyncio.Future[dict[Scope, Layer[T]]] = asyncio.ensure_future(self._load(mine))
            for scope in mine:
                self._loading[scope] = load
            load.add_done_callback(functools.partial(self._layers_loaded, scopes=tuple(mine)))
            joined.update(dict.fromkeys(mine, load))
        for pending in set(joined.values()):
            loaded = await asyncio.shield(pending)
            found.update({s: layer for s, layer in loaded.items() if joined.get(s) is pending})
        return found

    def _layers_loaded(self, load: asyncio.Future[dict[Scope, Layer[T]]], scopes: tuple[Scope, ...]) -> None:
        for scope in scopes:
            if self._loading.get(scope) is load:
                del self._loading[scope]
        if not load.cancelled():
            load.exception()  # retrieved here; each waiter still sees it

    async def _load(self, missing: list[Scope]) -> dict[Scope, Layer[T]]:
        found: dict[Scope, Layer[T]] = {}
        redis, codec = self.redis, self._codec
        if redis is not None and codec is not None:
            read = await _from_redis(redis, codec, missing)
            from_redis = {s: layer for s, layer in read.items() if self._usable(s, layer)}
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
            stored = await self._read(snap.conn, missing)
        loaded = {scope: Layer(stored[scope], xmin) for scope in missing}
        fresh = {s: layer for s, layer in loaded.items() if self._fresh(s, layer.xmin)}
        for scope, layer in loaded.items():
            self._loaded(scope, layer, cache=scope in fresh)
        if fresh and redis is not None and codec is not None:
            self._spawn(redis.set_many({s: _to_redis(codec, layer) for s, layer in fresh.items()}))
        found.update(loaded)
        return found

    def _usable(self, scope: Scope, layer: Layer[T]) -> bool:
        """A layer from Redis is used if no change after it was seen and no newer read of its scope was."""
        return self._fresh(scope, layer.xmin) and layer.xmin >= self._floor.get(scope, (0, 0.0))[0]

    def _loaded(self, scope: Scope, layer: Layer[T], cache: bool) -> None:
        """A layer just read may hold changes the feed has not delivered yet: responses built from older
        layers of the scope must not be served after it, and an older layer never replaces a newer one."""
        self._floor[scope] = (max(self._floor.get(scope, (0, 0.0))[0], layer.xmin), time.monotonic())
        self._responses.drop(scope)
        current = self._layers.get(scope)
        if current is None:
            if cache and (self._max_layers is None or len(self._layers) < self._max_layers):
                self._layers[scope] = layer
        elif cache and current.xmin <= layer.xmin:
            self._layers[scope] = layer
        self._prune()

    async def close(self) -> None:
        """Stop background Redis writes (the Redis client is the kernel's; it closes it)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


async def _from_redis(redis: RedisLayers, codec: LayerCodec[T], scopes: Sequence[Scope]) -> dict[Scope, Layer[T]]:
    found = {}
    for scope, blob in (await redis.get_many(scopes)).items():
        doc = json.loads(blob)
        found[scope] = Layer(codec.decode(scope, doc["values"]), doc["xmin"])
    return found


def _to_redis(codec: LayerCodec[T], layer: Layer[T]) -> bytes:
    doc = {"xmin": layer.xmin, "values": codec.encode(layer.value)}
    return json.dumps(doc, separators=(",", ":")).encode()
