"""Prebuilt response bodies of hot reads, indexed by the scopes they were built from and bounded in
bytes (segmented LRU, kernel.bounded_cache), so no caller can make the server keep more than the budget."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from prefd_server.kernel.bounded_cache import CacheBudget, SegmentedLru, bounded_cache
from prefd_server.kernel.model import Scope, ScopeKind

V = TypeVar("V")  # a response: its body, or something it is finished from

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
        self._scopes: dict[Hashable, tuple[Scope, ...]] = {}  # key -> the scopes its body is indexed under
        self._by_scope: dict[Scope, set[Hashable]] = {}
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
        indexed = tuple(s for s in scopes if s.kind is not ScopeKind.GLOBAL)
        cost = (len(body) if size is None else size) + _key_bytes(key) + _ENTRY_OVERHEAD_BYTES  # type: ignore[arg-type]
        if not self._bodies.put(key, body, cost):
            return
        if indexed:
            self._scopes[key] = indexed
        for scope in indexed:
            self._by_scope.setdefault(scope, set()).add(key)

    def drop(self, scope: Scope | None) -> None:
        """Forget bodies built from `scope` (all of them for GLOBAL or None)."""
        if scope is None or scope.kind is ScopeKind.GLOBAL:
            self.clear()
            return
        for key in self._by_scope.pop(scope, ()):
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
            keys = self._by_scope.get(scope)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_scope[scope]

    def __len__(self) -> int:
        return len(self._bodies)
