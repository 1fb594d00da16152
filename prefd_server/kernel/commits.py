"""Commits of this process: its caches hear of them at once, and every feed reader is woken."""

from __future__ import annotations

from collections.abc import Callable

from prefd_server.kernel.model import GLOBAL_SCOPE, ChangeKind, Scope

CommitListener = Callable[[Scope, int], None]


class LocalCommits:
    """Told by a store after its write transaction commits (kind, scope, xid).

    A domain registers a listener per change kind (its cache drops what the commit made stale, so
    this process reads its own writes at once); other processes learn of the commit from the feed,
    which `wake` prods (the local reader, and LISTEN/NOTIFY for the others).
    """

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self._wake = wake
        self._listeners: dict[ChangeKind, list[CommitListener]] = {}

    def add_listener(self, kind: ChangeKind, listener: CommitListener) -> None:
        """Call `listener(scope, xid)` after every local commit of `kind`."""
        self._listeners.setdefault(kind, []).append(listener)

    def set_wake(self, wake: Callable[[], None]) -> None:
        """What to call after every commit to wake the feed readers."""
        self._wake = wake

    def committed(self, kind: ChangeKind, scope: Scope = GLOBAL_SCOPE, xid: int = 0) -> None:
        """A transaction of this process that wrote change rows of `kind` at `scope` committed as `xid`."""
        for listener in self._listeners.get(kind, ()):
            listener(scope, xid)
        self._wake()

    def feed_appended(self, xid: int) -> None:
        """Change rows that invalidate no cache (budget crossings, maintenance) committed as `xid`."""
        self.committed(ChangeKind.BUDGET, xid=xid)
