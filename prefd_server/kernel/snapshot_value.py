"""One value read for everyone at a snapshot horizon (definitions, a model catalog), kept fresh by change
xids the way the scoped cache keeps layers."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import asyncpg

from prefd_server.kernel.db import breaker_of, snapshot
from prefd_server.kernel.deadline import CallDeadlineExceeded, visit_deadline

V = TypeVar("V")


class SnapshotValue(Generic[V]):
    """One value read for everyone at a snapshot horizon (definitions, a model catalog).

    A change drops it; a read older than the newest change still answers its own callers but is
    never kept, and a load begun before a change serves no later caller. Concurrent misses share one load,
    which belongs to no one caller: it runs outside every caller's context, each caller's deadline (as a
    database visit's) ends only its own wait, and with PostgreSQL known down (the pool's breaker open)
    the load fails at once, as does a caller that would join it.
    """

    def __init__(
        self, pool: asyncpg.Pool, read: Callable[[asyncpg.Connection], Awaitable[V]], changed: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._breaker = breaker_of(pool)
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
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.get_running_loop().create_task(
                self._load(), context=contextvars.Context()
            )
            loading.add_done_callback(self._loaded)
        elif self._breaker is not None:
            self._breaker.check()  # the load in flight will not answer (and is being given up on)
        deadline = visit_deadline()
        if deadline is None:
            return await asyncio.shield(loading)
        done, _ = await asyncio.wait((loading,), timeout=deadline - time.monotonic())  # never cancels the load
        if not done:
            raise CallDeadlineExceeded("the database did not answer within the call's deadline")
        return loading.result()

    def _loaded(self, load: asyncio.Future[V]) -> None:
        if self._loading is load:
            self._loading = None
        if not load.cancelled():
            load.exception()  # retrieved here; each waiter still sees it

    async def _load(self) -> V:
        breaker = self._breaker
        if breaker is not None:
            breaker.check()  # outside any call the pool does not
        async with snapshot(self._pool, (lambda: breaker.is_open) if breaker is not None else None) as snap:
            xmin = snap.xmin
            loaded = await self._read(snap.conn)
        if xmin > self._changed_xid:
            self.value = loaded
        return loaded
