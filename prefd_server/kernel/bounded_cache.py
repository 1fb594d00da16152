"""In-process caches bounded in bytes: a segmented LRU per cache, its share of one budget, and the figures
(bytes, entries, hits, misses, evictions) the metrics endpoint reports.

Eviction is segmented LRU (SLRU): a new entry enters a probation segment; a hit there promotes it to a
protected segment (80% of the bytes); the protected segment's least recently used entries fall back to
probation, and eviction takes probation's least recently used entries, one at a time. A scan of
subjects read once churns probation only, so what is read again and again stays. This is the main
region of W-TinyLFU without its frequency sketch: counting every hit in a sketch would cost more in
Python than it saves, while SLRU's hit is two C-level OrderedDict operations. Nothing is ever cleared at
once by eviction; clear() is for invalidation (a change that makes every entry stale).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Default total of every in-process cache: sized for a small container.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
PROTECTED_SHARE = 0.8

# Each named cache's share of the budget. Preferences read at scale need the override layers (one per
# subject read), the prebuilt responses and the per-org bases; the others are smaller working sets.
SHARES: dict[str, float] = {
    "preferences.layers": 0.20,
    "preferences.responses": 0.30,
    "preferences.org_bases": 0.22,
    "preferences.requests": 0.03,
    "ai_config.layers": 0.03,
    "ai_config.responses": 0.03,
    "ai_config.requests": 0.01,
    "consents.layers": 0.04,
    "consents.responses": 0.01,
    "notifications.decisions": 0.08,
    "notifications.decision_paths": 0.02,
    "notifications.requests": 0.03,
}

_SIZE = re.compile(r"\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*", re.IGNORECASE)
_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Bytes of a size such as `268435456`, `256MiB` or `1GB`; ValueError unless a positive size."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with KB, KiB, MB, MiB, GB or GiB)")
    size = int(match.group(1)) * _UNITS[match.group(2).lower() if match.group(2) else None]
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def approximate_size(value: object, depth: int = 0) -> int:
    """Roughly the bytes `value` holds: strings, numbers, containers and dataclasses, nested (a cache's
    cost for an entry; it runs when an entry is stored, never on a hit)."""
    if value is None or isinstance(value, bool | int | float | Enum):
        return 32
    if isinstance(value, str | bytes):
        return 49 + len(value)
    if depth > 8:
        return 64
    if isinstance(value, dict):
        return 64 + sum(32 + approximate_size(k, depth + 1) + approximate_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 56 + sum(8 + approximate_size(item, depth + 1) for item in value)
    if is_dataclass(value):
        return 56 + sum(8 + approximate_size(getattr(value, f.name), depth + 1) for f in fields(value))
    return 64


@dataclass(frozen=True, slots=True)
class CacheFigures:
    """One cache's figures at a moment."""

    name: str
    budget_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int


class SegmentedLru(Generic[K, V]):
    """Values by key within a byte budget, evicted by segmented LRU (see the module docstring).

    `on_evict(key, value)` runs for each entry eviction removes (not for pop() or clear()).
    """

    def __init__(self, name: str, budget_bytes: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache {name}: the budget must be positive (got {budget_bytes})")
        self.name = name
        self.budget = budget_bytes
        self._protected_budget = int(budget_bytes * PROTECTED_SHARE)
        self._on_evict = on_evict
        # key -> (value, cost in bytes)
        self._probation: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._protected: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._protected_bytes = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """The value for `key` (counted as a hit or a miss; a hit makes it recently used)."""
        entry = self._protected.get(key)
        if entry is not None:
            self._protected.move_to_end(key)
            self.hits += 1
            return entry[0]
        entry = self._probation.pop(key, None)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._protect(key, entry)
        return entry[0]

    def peek(self, key: K) -> V | None:
        """The value for `key` without counting or reordering."""
        entry = self._protected.get(key) or self._probation.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, cost: int) -> bool:
        """Keep `value` for `key` at `cost` bytes (replacing any value it had); False if it exceeds the
        whole budget (then nothing is kept for `key`)."""
        self.pop(key)
        if cost > self.budget:
            return False
        self._probation[key] = (value, cost)
        self.bytes += cost
        self._evict()
        return True

    def pop(self, key: K) -> V | None:
        """Remove `key`; its value, or None."""
        entry = self._probation.pop(key, None)
        if entry is None:
            entry = self._protected.pop(key, None)
            if entry is None:
                return None
            self._protected_bytes -= entry[1]
        self.bytes -= entry[1]
        return entry[0]

    def clear(self) -> None:
        """Forget everything (invalidation, not eviction)."""
        self._probation.clear()
        self._protected.clear()
        self._protected_bytes = 0
        self.bytes = 0

    def figures(self) -> CacheFigures:
        return CacheFigures(self.name, self.budget, self.bytes, len(self), self.hits, self.misses, self.evictions)

    def keys(self) -> Iterator[K]:
        """Every key (probation first, each segment least recently used first)."""
        yield from list(self._probation)
        yield from list(self._protected)

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: object) -> bool:
        return key in self._protected or key in self._probation

    def _protect(self, key: K, entry: tuple[V, int]) -> None:
        """Move a probation entry read again into the protected segment; the protected segment's least
        recently used entries beyond its share fall back to probation's most recent end."""
        self._protected[key] = entry
        self._protected_bytes += entry[1]
        while self._protected_bytes > self._protected_budget and len(self._protected) > 1:
            demoted, demoted_entry = self._protected.popitem(last=False)
            self._protected_bytes -= demoted_entry[1]
            self._probation[demoted] = demoted_entry

    def _evict(self) -> None:
        while self.bytes > self.budget:
            segment = self._probation if self._probation else self._protected
            key, (value, cost) = segment.popitem(last=False)
            if segment is self._protected:
                self._protected_bytes -= cost
            self.bytes -= cost
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(key, value)


class CacheBudget:
    """One byte budget split among the named caches by SHARES; keeps every cache made from it for the
    metrics endpoint."""

    def __init__(self, total_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if total_bytes <= 0:
            raise ValueError(f"the cache budget must be positive (got {total_bytes})")
        self.total_bytes = total_bytes
        self._caches: list[SegmentedLru[object, object]] = []

    def bytes_for(self, name: str) -> int:
        """The share of the budget of cache `name` (the shares add up to at most the whole)."""
        return max(1, int(self.total_bytes * SHARES[name]))

    def cache(self, name: str, on_evict: Callable[[K, V], None] | None = None) -> SegmentedLru[K, V]:
        """A new cache with its share of the budget, reported under `name`."""
        made: SegmentedLru[K, V] = SegmentedLru(name, self.bytes_for(name), on_evict)
        self._caches.append(made)  # type: ignore[arg-type]
        return made

    def figures(self) -> list[CacheFigures]:
        """Every cache's figures (caches sharing a name, e.g. one per worker service, added up)."""
        added: dict[str, CacheFigures] = {}
        for cache in self._caches:
            f = cache.figures()
            seen = added.get(f.name)
            if seen is not None:
                f = CacheFigures(
                    f.name,
                    seen.budget_bytes + f.budget_bytes,
                    seen.bytes + f.bytes,
                    seen.entries + f.entries,
                    seen.hits + f.hits,
                    seen.misses + f.misses,
                    seen.evictions + f.evictions,
                )
            added[f.name] = f
        return list(added.values())


def bounded_cache(
    name: str, budget: CacheBudget | int | None, on_evict: Callable[[K, V], None] | None = None
) -> SegmentedLru[K, V]:
    """Cache `name`: a share of `budget`, or exactly `budget` bytes, or its share of the default budget."""
    if isinstance(budget, CacheBudget):
        return budget.cache(name, on_evict)
    if budget is None:
        budget = CacheBudget().bytes_for(name)
    return SegmentedLru(name, budget, on_evict)
