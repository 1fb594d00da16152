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
import contextvars
import functools
import json
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg

from prefd_server.kernel.bounded_cache import CacheBudget, SegmentedLru, bounded_cache
from prefd_server.kernel.change_marks import ChangeMarks
from prefd_server.kernel.db import breaker_of, snapshot, terminated_if, translated_errors
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, ScopeKey, ScopeKind, scope_key
from prefd_server.kernel.redis import RedisLayers
from prefd_server.kernel.response_cache import Kept, ResponseCache
from prefd_server.kernel.snapshot_value import SnapshotValue

T = TypeVar("T")
V = TypeVar("V")

# A layer's bytes beyond its overrides: the Layer, its Scope key, the dict and the cache's slot.
LAYER_OVERHEAD_BYTES = 400
# A snapshot floor guards against serving a layer older than one this process read, until the feed has
# delivered the change between them (normally milliseconds; feed lag is in the metrics). Floors older
# than this are let go by count without standing in for every scope.
FLOOR_MATTERS_FOR_S = 10.0
# Loads of missing layers running at once; misses arriving meanwhile wait and are read together.
MAX_LOADS_IN_FLIGHT = 2


class Layer(NamedTuple, Generic[T]):
    """What one scope held as of a snapshot whose horizon was `xmin`. Two views of one cached layer hold
    the same value object and xmin (`same_layer`)."""

    value: T
    xmin: int


def same_layer(a: Layer[Any] | None, b: Layer[Any] | None) -> bool:
    """Whether two layers are views of the same read (the same value object at the same horizon)."""
    if a is None or b is None:
        return a is b
    return a.value is b.value and a.xmin == b.xmin


@dataclass(slots=True)
class _Batch(Generic[T]):
    """Missing scopes queued for one load, and the future its readers wait on."""

    future: asyncio.Future[dict[Scope, Layer[T]]]
    scopes: list[Scope]
    scheduled: bool = False


class CacheStats:
    """Hit and miss counts per layer (l1, l2) and of prebuilt responses (plain ints on the hot path)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {"l1": 0, "l2": 0}
        self.misses: dict[str, int] = {"l1": 0, "l2": 0}
        self.responses: ResponseCache[Kept] | None = None  # whose hits and misses count as "response"

    def by_layer(self) -> tuple[dict[str, int], dict[str, int]]:
        """(hits, misses) by layer name, responses included."""
        return (
            {**self.hits, "response": self.responses.hits if self.responses else 0},
            {**self.misses, "response": self.responses.misses if self.responses else 0},
        )


@dataclass(frozen=True, slots=True)
class LayerCodec(Generic[T]):
    """How a layer's value is written to Redis: to a JSON-able document and back."""

    encode: Callable[[T], object]
    decode: Callable[[Scope, Any], T]


class ScopedCache(Generic[T]):
    """Each scope's layer from L1, else Redis, else one PostgreSQL snapshot; and prebuilt responses."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        read: Callable[[asyncpg.Connection, Sequence[Scope]], Awaitable[Mapping[Scope, T]]],
        redis: RedisLayers | None = None,
        codec: LayerCodec[T] | None = None,
        *,
        name: str,
        budget: CacheBudget | None = None,
        sizeof: Callable[[T], int] | None = None,
        read_now: Callable[[asyncpg.Connection, Sequence[Scope]], Awaitable[tuple[int, Mapping[Scope, T]]]]
        | None = None,
        empty: T | None = None,
        read_pool: asyncpg.Pool | None = None,
    ) -> None:
        """`name` names the two caches ("<name>.layers", "<name>.responses") whose shares of `budget`
        bound the layers and the prebuilt responses; `sizeof(value)` estimates a layer's bytes beyond
        LAYER_OVERHEAD_BYTES (default: nothing beyond it). `read_now(conn, scopes)`, when given, reads the
        layers and their snapshot's horizon in one statement (else `read` runs in a snapshot transaction).
        `empty`: a shared, never modified value every layer equal to it is handed out as (kept as None).
        `read_pool`: where `read_now` runs (connections for single statements), else `pool`."""
        if redis is not None and codec is None:
            raise ValueError("a Redis layer cache needs a codec")
        self._pool = pool
        self._read = read
        self.redis = redis
        self._codec = codec
        self._sizeof = sizeof
        self._read_now = read_now
        self._read_pool = read_pool or pool
        self._empty = empty
        self._next_batch: _Batch[T] | None = None
        self._loads_in_flight = 0
        self.stats = CacheStats()
        # scope -> (value, xmin), the value None for a layer equal to `empty`: a plain tuple of atoms, which
        # the garbage collector stops tracking (a Layer, a tuple subclass, or any container inside would
        # keep it tracked); lookups hand out Layer views of it.
        self._layers: SegmentedLru[ScopeKey, tuple[T | None, int]] = bounded_cache(f"{name}.layers", budget)
        self._loading: dict[Scope, asyncio.Future[dict[Scope, Layer[T]]]] = {}
        self._changed = ChangeMarks()  # scope -> the newest change xid heard, and its tick
        # Newest snapshot horizon this process has used per scope, so it never goes back.
        self._floor = ChangeMarks(FLOOR_MATTERS_FOR_S)
        self._tick = 0
        self._global_tick = 0
        self._responses: ResponseCache[Kept] = ResponseCache(f"{name}.responses", budget)
        self.stats.responses = self._responses
        # A prebuilt response body, if one is kept for `key` (one call on the hot path).
        self.response: Callable[[Hashable], Kept | None] = self._responses.get
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

    def forget(self, scope: Scope, xid: int, redis_delete: bool = True) -> None:
        """`scope` changed in transaction `xid` (a commit of this process: its own reads see it at once)."""
        self._forget(scope, xid)
        if redis_delete and self.redis is not None:
            self._spawn(self.redis.delete([scope]))

    def forget_all(self, xid: int) -> None:
        """Drop every cached layer and response, as if each cached scope changed in `xid`."""
        for kind, scope_id in list(self._layers.keys()):
            self._forget(Scope(ScopeKind(kind), scope_id), xid)
        self._responses.clear()

    def _forget(self, scope: Scope, xid: int) -> None:
        self._tick += 1
        key = scope_key(scope)
        self._changed.raise_to(key, xid, self._tick)
        self._layers.pop(key)
        self._loading.pop(scope, None)  # a load begun before this change must not serve later readers
        self._responses.drop(scope)

    def _global_changed(self) -> None:
        self._tick += 1
        self._global_tick = self._tick
        self._responses.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fresh(self, scope: Scope, xmin: int) -> bool:
        if xmin <= self._changed.everywhere:
            return False
        changed = self._changed.get(scope_key(scope))
        return changed is None or xmin > changed[0]

    def _floor_of(self, scope: Scope) -> int:
        floor = self._floor.get(scope_key(scope))
        return max(self._floor.everywhere, floor[0] if floor is not None else 0)

    # --- responses ---------------------------------------------------------------------

    @property
    def tick(self) -> int:
        """Grows with every invalidation; compare before and after building a response."""
        return self._tick

    def changed_since(self, scopes: Iterable[Scope], tick: int) -> bool:
        """Whether any of `scopes` (or a snapshot value) was invalidated after `tick`."""
        if self._global_tick > tick or self._changed.everywhere_tick > tick:
            return True
        for scope in scopes:
            changed = self._changed.get(scope_key(scope))
            if changed is not None and changed[1] > tick:
                return True
        return False

    def store_response(
        self,
        key: Hashable,
        used: Mapping[Scope, int],
        since_tick: int,
        body: Kept,
        size: int | None = None,
        also_under: Scope | None = None,
    ) -> None:
        """Keep a response body built from layers read at `used` (scope -> xmin) since `since_tick`,
        unless a change was seen after `since_tick` or a newer layer of one of its scopes was read.
        `size`: the bytes it adds (default: the body's length); `also_under`: a scope whose drop_responses
        drops it too."""
        if self.changed_since(used, since_tick):
            return
        for scope, xmin in used.items():
            if xmin < self._floor_of(scope):
                return
        self._responses.put(key, body, (*used, also_under) if also_under is not None else used, size)

    def replace_response(self, key: Hashable, body: Kept, size: int) -> None:
        """Keep `body` (`size` bytes) for `key` instead of what is kept, if anything still is."""
        self._responses.replace(key, body, size)

    def drop_responses(self, scope: Scope) -> None:
        """Forget the responses built from (or kept under) `scope`."""
        self._responses.drop(scope)

    # --- reads -------------------------------------------------------------------------

    def peek(self, scope: Scope) -> Layer[T] | None:
        """The layer of `scope` if this process holds it (no Redis, no database, no wait)."""
        held = self._layers.get((scope.kind.value, scope.id))
        if held is None:
            return None
        value = held[0]
        return Layer(self._empty if value is None else value, held[1])  # type: ignore[arg-type]  # None only when empty is set

    async def layers(self, scopes: Sequence[Scope]) -> dict[Scope, Layer[T]]:
        """The layer of each scope: L1, else L2, else PostgreSQL (one snapshot for all).

        Concurrent misses of the same scope share one load, and misses of different scopes arriving in
        the same event-loop turn, or while MAX_LOADS_IN_FLIGHT loads run, are read together (one Redis
        round trip, one statement).
        """
        found: dict[Scope, Layer[T]] = {}
        missing = []
        for scope in scopes:
            held = self._layers.get((scope.kind.value, scope.id))
            if held is not None:
                value = held[0]
                found[scope] = Layer(self._empty if value is None else value, held[1])  # type: ignore[arg-type]  # None only when empty is set
            else:
                missing.append(scope)
        self.stats.hits["l1"] += len(found)
        self.stats.misses["l1"] += len(missing)
        if not missing:
            return found
        joined = {s: self._loading[s] for s in missing if s in self._loading}
        mine = [s for s in missing if s not in joined]
        if mine:
            load = self._queue(mine)
            for scope in mine:
                self._loading[scope] = load
            load.add_done_callback(functools.partial(self._layers_loaded, scopes=tuple(mine)))
            joined.update(dict.fromkeys(mine, load))
        for pending in set(joined.values()):
            loaded = await asyncio.shield(pending)
            found.update({s: layer for s, layer in loaded.items() if joined.get(s) is pending})
        return found

    def _queue(self, scopes: list[Scope]) -> asyncio.Future[dict[Scope, Layer[T]]]:
        """The future of the load that will read `scopes` with the others queued alongside."""
        batch = self._next_batch
        if batch is None:
            batch = self._next_batch = _Batch(asyncio.get_running_loop().create_future(), [])
            if self._loads_in_flight < MAX_LOADS_IN_FLIGHT:
                batch.scheduled = True
                # A shared load belongs to no one call: it runs outside the caller's context (its
                # deadline), and each reader's own deadline ends only its wait.
                asyncio.get_running_loop().call_soon(self._start_next_batch, context=contextvars.Context())
        batch.scopes.extend(scopes)
        return batch.future

    def _start_next_batch(self) -> None:
        batch, self._next_batch = self._next_batch, None
        if batch is None:
            return
        self._loads_in_flight += 1
        task = asyncio.ensure_future(self._load(batch.scopes))
        task.add_done_callback(functools.partial(self._batch_done, batch=batch))

    def _batch_done(self, task: asyncio.Future[dict[Scope, Layer[T]]], batch: _Batch[T]) -> None:
        self._loads_in_flight -= 1
        if task.cancelled():
            batch.future.cancel()
        elif task.exception() is not None:
            batch.future.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            batch.future.set_result(task.result())
        waiting = self._next_batch
        if waiting is not None and not waiting.scheduled:
            waiting.scheduled = True
            asyncio.get_running_loop().call_soon(self._start_next_batch, context=contextvars.Context())

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
        breaker = breaker_of(self._read_pool)
        if breaker is not None:
            breaker.check()  # outside any call the pool would not: with the database known down, fail fast
        # And a read gives up on its connection once it is known down: one a partition hung would hold the
        # load, every reader joined to it and its place among the loads in flight until TCP retransmits.
        known_down = (lambda: breaker.is_open) if breaker is not None else None
        if self._read_now is not None:
            async with translated_errors(), self._read_pool.acquire() as conn:
                with terminated_if(conn, known_down):
                    xmin, stored = await self._read_now(conn, missing)
        else:
            async with snapshot(self._pool, known_down) as snap:
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
        return self._fresh(scope, layer.xmin) and layer.xmin >= self._floor_of(scope)

    def _loaded(self, scope: Scope, layer: Layer[T], cache: bool) -> None:
        """A layer just read may hold changes the feed has not delivered yet: responses built from older
        layers of the scope must not be served after it, and an older layer never replaces a newer one."""
        key = scope_key(scope)
        self._floor.raise_to(key, layer.xmin, self._tick)
        self._responses.drop(scope)
        current = self._layers.peek(key)
        if cache and (current is None or current[1] <= layer.xmin):
            size = LAYER_OVERHEAD_BYTES + (self._sizeof(layer.value) if self._sizeof is not None else 0)
            empty = self._empty is not None and layer.value == self._empty
            self._layers.put(key, (None if empty else layer.value, layer.xmin), size)

    @property
    def layers_cached(self) -> int:
        """How many layers are kept."""
        return len(self._layers)

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
