"""Prebuilt response bodies of hot reads, indexed by the scopes they were built from and bounded in
bytes (segmented LRU, kernel.bounded_cache), so no caller can make the server keep more than the budget."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar

from prefd_server.kernel.bounded_cache import CacheBudget, SegmentedLru, bounded_cache
from prefd_server.kernel.model import Scope, ScopeKey, ScopeKind, scope_key

V = TypeVar("V")  # a response: its body, or something it is finished from


class LazyBody(Protocol):
    """A response kept in parts and joined when served (smaller than its body)."""

    def body(self) -> bytes: ...


# A kept response: its body, or its parts.
Kept = bytes | LazyBody

# A dict slot, the key tuple and the per-scope index entries of one response, roughly.
_ENTRY_OVERHEAD_BYTES = 512


def _key_bytes(key: Hashable) -> int:
    """A rough size of a response key (tuples of strings, bytes and flags)."""
    if isinstance(key, str | bytes):
        return len(key)
    if isinstance(key, tuple):
        return sum(_key_bytes(part) for part in key) + 8 * len(key)
    return 8


class ResponseCache(Generic[V]):
    """Response bodies by key; GLOBAL-built bodies are dropped by clear(), the rest by their scopes."""

    def __init__(self, name: str, budget: CacheBudget | int | None = None) -> None:
        self._bodies: SegmentedLru[Hashable, V] = bounded_cache(name, budget, self._evicted)
        self._scopes: dict[Hashable, tuple[ScopeKey, ...]] = {}  # key -> the scopes its body is indexed under
        # scope -> the key of the one body built from it, or a set of keys when several were
        self._by_scope: dict[ScopeKey, Hashable | set[Hashable]] = {}
        # The body for a key, if kept (the cache's own lookup: one call on the hot path).
        self.get: Callable[[Hashable], V | None] = self._bodies.get

    @property
    def bytes(self) -> int:
        return self._bodies.bytes

    @property
    def hits(self) -> int:
        return self._bodies.hits

    @property
    def misses(self) -> int:
        return self._bodies.misses

    def put(self, key: Hashable, body: V, scopes: Iterable[Scope], size: int | None = None) -> None:
        """Keep `body` for `key`, built from `scopes`; evicts the least used bodies beyond the budget.
        `size` is the body's size in bytes (by default its length: bodies are bytes)."""
        self._discard(key)
        indexed = tuple(scope_key(s) for s in scopes if s.kind is not ScopeKind.GLOBAL)
        cost = (len(body) if size is None else size) + _key_bytes(key) + _ENTRY_OVERHEAD_BYTES  # type: ignore[arg-type]
        if not self._bodies.put(key, body, cost):
            return
        if indexed:
            self._scopes[key] = indexed
        by_scope = self._by_scope
        for scope in indexed:
            held = by_scope.get(scope)
            if held is None:
                by_scope[scope] = key
            elif isinstance(held, set):
                held.add(key)
            elif held != key:
                by_scope[scope] = {held, key}

    def replace(self, key: Hashable, body: V, size: int) -> None:
        """Keep `body` for `key` instead of what is kept (same scopes), at `size` bytes; nothing if gone."""
        if key in self._bodies:
            self._bodies.put(key, body, size + _key_bytes(key) + _ENTRY_OVERHEAD_BYTES)

    def drop(self, scope: Scope | None) -> None:
        """Forget bodies built from `scope` (all of them for GLOBAL or None)."""
        if scope is None or scope.kind is ScopeKind.GLOBAL:
            self.clear()
            return
        held = self._by_scope.pop(scope_key(scope), None)
        for key in held if isinstance(held, set) else () if held is None else (held,):
            self._discard(key)

    def clear(self) -> None:
        self._bodies.clear()
        self._scopes.clear()
        self._by_scope.clear()

    def _discard(self, key: Hashable) -> None:
        if self._bodies.pop(key) is not None:
            self._unindex(key)

    def _evicted(self, key: Hashable, body: V) -> None:
        self._unindex(key)

    def _unindex(self, key: Hashable) -> None:
        for scope in self._scopes.pop(key, ()):
            held = self._by_scope.get(scope)
            if isinstance(held, set):
                held.discard(key)
                if not held:
                    del self._by_scope[scope]
            elif held is not None and held == key:
                del self._by_scope[scope]

    def __len__(self) -> int:
        return len(self._bodies)
