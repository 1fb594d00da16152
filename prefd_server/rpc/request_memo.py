"""Parsed hot-path requests remembered by their bytes, bounded in bytes rather than entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prefd_server.kernel.bounded_cache import CacheBudget, SegmentedLru, bounded_cache

T = TypeVar("T")

# Requests larger than this are parsed on every call: real reads are tens of bytes, and only small
# ones are worth remembering (a caller cannot make the server keep large ones).
MAX_REMEMBERED_REQUEST_BYTES = 512
# Rough size of a dict slot plus a small parsed tuple, added to each entry's bytes.
_ENTRY_OVERHEAD_BYTES = 256


class RequestMemo(Generic[T]):
    """Request bytes -> their validated parse; the least used entries go first when over budget."""

    def __init__(self, name: str, budget: CacheBudget | int | None = None) -> None:
        self._entries: SegmentedLru[bytes, T] = bounded_cache(name, budget)
        # The parse of request bytes, if remembered (the cache's own lookup: one call on the hot path).
        self.get: Callable[[bytes], T | None] = self._entries.get

    def remember(self, raw: bytes, parsed: T, parsed_bytes: int = 0) -> None:
        """Keep `parsed` for `raw` if it is small enough; `parsed_bytes` estimates what it holds."""
        if len(raw) > MAX_REMEMBERED_REQUEST_BYTES or raw in self._entries:
            return
        self._entries.put(raw, parsed, 2 * len(raw) + parsed_bytes + _ENTRY_OVERHEAD_BYTES)

    def __len__(self) -> int:
        return len(self._entries)
