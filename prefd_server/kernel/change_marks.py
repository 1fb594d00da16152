"""Per-scope marks the caches keep for freshness (the newest change heard, the newest snapshot horizon
read), bounded in number and trimmed one at a time."""

from __future__ import annotations

import time
from collections import OrderedDict

from prefd_server.kernel.model import ScopeKey

# How long a processed change keeps vetoing layers read before it (longer than any read takes).
CHANGE_MEMORY_S = 120.0
# At most this many change marks and floors each (about 200 bytes apiece). Beyond it the oldest go, and
# one mark for every scope stands in for those that go before CHANGE_MEMORY_S: correct, only stricter.
MAX_MARKS = 65_536


class ChangeMarks:
    """A number per scope (a change's xid, a read's horizon) with the tick it was set at, oldest set first:
    each set drops the marks older than CHANGE_MEMORY_S and those beyond MAX_MARKS, one at a time. A mark
    dropped while it may still matter (younger than `matters_for_s`) raises `everywhere` (a mark for every
    scope) and `everywhere_tick`."""

    def __init__(self, matters_for_s: float = CHANGE_MEMORY_S) -> None:
        self._marks: OrderedDict[ScopeKey, tuple[int, int, float]] = OrderedDict()  # -> (number, tick, when)
        self._matters_for_s = matters_for_s
        self.everywhere = 0
        self.everywhere_tick = 0

    def get(self, scope: ScopeKey) -> tuple[int, int] | None:
        """(number, tick) of the scope's mark."""
        mark = self._marks.get(scope)
        return None if mark is None else (mark[0], mark[1])

    def raise_to(self, scope: ScopeKey, number: int, tick: int) -> None:
        """Set the scope's mark to at least `number`, at `tick`."""
        now = time.monotonic()
        previous = self._marks.pop(scope, None)
        self._marks[scope] = (max(number, previous[0]) if previous else number, tick, now)
        cutoff = now - CHANGE_MEMORY_S
        marks = self._marks
        while marks:
            held, _, when = next(iter(marks.values()))
            if when >= cutoff and len(marks) <= MAX_MARKS:
                break
            marks.popitem(last=False)
            if when >= now - self._matters_for_s:
                self.everywhere = max(self.everywhere, held)
                self.everywhere_tick = tick

    def __len__(self) -> int:
        return len(self._marks)
