"""Parsed hot-path requests remembered by their bytes, bounded in bytes rather than entries."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

# Requests larger than this are parsed on every call: real reads are tens of bytes, and only small
# ones are worth remembering (a caller cannot make the server keep large ones).
MAX_REMEMBERED_REQUEST_BYTES = 512
# Bytes of all remembered requests of one memo (keys plus an estimate of each parsed value).
DEFAULT_BUDGET_BYTES = 4 * 1024 * 1024
# Rough size of a dict slot plus a small parsed tuple, added to each entry's bytes.
_ENTRY_OVERHEAD_BYTES = 256


class RequestMemo(Generic[T]):
    """Request bytes -> their validated parse; the oldest entries go first when over budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self._budget = budget_bytes
        self._entries: dict[bytes, tuple[T, int]] = {}
        self.bytes = 0

    def get(self, raw: bytes) -> T | None:
        entry = self._entries.get(raw)
        return None if entry is None else entry[0]

    def remember(self, raw: bytes, parsed: T, parsed_bytes: int = 0) -> None:
        """Keep `parsed` for `raw` if it is small enough; `parsed_bytes` estimates what it holds."""
        if len(raw) > MAX_REMEMBERED_REQUEST_BYTES or raw in self._entries:
            return
        cost = 2 * len(raw) + parsed_bytes + _ENTRY_OVERHEAD_BYTES
        self._entries[raw] = (parsed, cost)
        self.bytes += cost
        while self.bytes > self._budget:
            oldest = next(iter(self._entries))
            self.bytes -= self._entries.pop(oldest)[1]

    def __len__(self) -> int:
        return len(self._entries)
