"""One value read for everyone at a snapshot horizon (definitions, a model catalog), kept fresh by change
xids the way the scoped cache keeps layers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import asyncpg

from prefd_server.kernel.db import snapshot

V = TypeVar("V")


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
