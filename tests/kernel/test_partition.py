"""Kernel work outside any call across a partition that leaves connections hanging for good (StallingRelay):
the feed reader reads on a fresh connection as soon as the health monitor finds PostgreSQL back, and asks
the monitor to check again before handing on what it read while PostgreSQL is held down; a shared load (a
scope layer, a snapshot value) gives up on its connection when PostgreSQL is known down, a read that would
join it fails at once, and a snapshot value's load belongs to none of its callers (one caller's deadline
ends only that caller's wait)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

import asyncpg
import pytest

from prefd_server.kernel.db import breaker_of, create_pool, init_connection, lock_scope
from prefd_server.kernel.deadline import CallDeadlineExceeded, DatabaseBreaker, start_call
from prefd_server.kernel.errors import DatabaseUnavailable
from prefd_server.kernel.feed import FeedReader, Mailbox
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import CallInfo, KeyChange, Scope, ScopeKind
from prefd_server.kernel.scoped_cache import ScopedCache
from prefd_server.kernel.snapshot_value import SnapshotValue
from prefd_server.preferences import store as preference_sql
from tests.helpers.netns import StallingRelay, stalling_relay
from tests.helpers.requests import eventually
from tests.helpers.settings import migrated_database

T = TypeVar("T")
# After the monitor finds PostgreSQL back, how soon the reader must have read on a fresh connection.
BACK_WITHIN_S = 1.0
# How soon work that waits on PostgreSQL must fail once it is known down.
AT_ONCE_S = 0.5


class _CallContext:
    """Just enough of grpc's ServicerContext for a call budget: the client's deadline."""

    def __init__(self, deadline_s: float) -> None:
        self._until = time.monotonic() + deadline_s

    def time_remaining(self) -> float:
        return self._until - time.monotonic()


def in_call(work: Callable[[], Awaitable[T]], deadline_s: float) -> asyncio.Task[T]:
    """`work` run as an RPC with a client deadline of `deadline_s` would run it."""

    async def call() -> T:
        start_call(_CallContext(deadline_s), ceiling_s=30)
        return await work()

    return asyncio.create_task(call())


@contextlib.asynccontextmanager
async def behind_relay(
    server_url: str, fresh_database: Any, migrated: bool = False
) -> AsyncIterator[tuple[StallingRelay, asyncpg.Pool, DatabaseBreaker, str]]:
    """(relay, a pool through it, the pool's breaker, the database's direct URL)."""
    url = await (migrated_database(fresh_database) if migrated else fresh_database())
    async with stalling_relay(server_url) as relay:
        pool = await create_pool(relay.url(urlparse(url).path.lstrip("/")), 2, 4, 10_000)
        breaker = breaker_of(pool)
        assert breaker is not None
        try:
            yield relay, pool, breaker, url
        finally:
            pool.terminate()


async def commit_change(url: str, key: str, value: str) -> None:
    """A key's first GLOBAL value, committed straight to the database (not through the relay)."""
    scope = Scope(ScopeKind.GLOBAL, "")
    conn = await asyncpg.connect(url)
    try:
        await init_connection(conn)
        async with conn.transaction():
            await lock_scope(conn, scope)
            change = KeyChange(key, None, value, 0, 1)
            await preference_sql.apply_changes(conn, scope, [change], CallInfo(actor="test"), "partition test")
    finally:
        await conn.close()


async def next_event(queue: Mailbox[Any], deadline_s: float) -> ChangeEvent:
    async with asyncio.timeout(deadline_s):
        event = await queue.get()
    assert isinstance(event, ChangeEvent), event
    return event


async def test_the_feed_reader_reads_on_a_fresh_connection_as_soon_as_the_database_is_back(
    server_url: str, fresh_database: Any
) -> None:
    async with behind_relay(server_url, fresh_database, migrated=True) as (relay, pool, breaker, url):
        reader = FeedReader(pool, relay.url(urlparse(url).path.lstrip("/")), 0.05, 100)
        await reader.start()
        subscription, _ = reader.subscribe(None, ())
        try:
            relay.cut()
            await relay.until_stalled(1, 5)  # the reader's next read hangs with its connection
            breaker.record(False)  # the health monitor finds PostgreSQL down: the reader gives up on it

            async def gave_up() -> bool:  # (the reader offers no event for it)
                return not reader.healthy

            await eventually(gave_up, 2)
            await commit_change(url, "display.theme", "dark")  # committed while this process is cut off
            relay.heal()
            breaker.record(True)  # ... and back: the reader's read from the outage still hangs
            began = time.monotonic()
            event = await next_event(subscription.queue, 5)
            assert (event.key, time.monotonic() - began < BACK_WITHIN_S) == ("display.theme", True)
        finally:
            # First (when the test failed): a reader waiting on a hung connection would hold up its stop.
            relay.heal()
            pool.terminate()
            await reader.stop("test over")


async def test_a_read_while_the_database_is_held_down_asks_the_monitor_first(fresh_database: Any) -> None:
    url = await migrated_database(fresh_database)
    pool = await create_pool(url, 1, 4, 10_000)
    breaker = breaker_of(pool)
    assert breaker is not None
    reader = FeedReader(pool, url, 0.05, 100)
    # Whether the breaker was open when each batch went on to listeners (caches) and watchers.
    open_at_dispatch: list[bool] = []
    reader.add_listener(lambda events: open_at_dispatch.append(breaker.is_open))
    rechecks = 0

    async def recheck() -> None:  # the health monitor's: it finds PostgreSQL reachable
        nonlocal rechecks
        rechecks += 1
        breaker.record(True)

    reader.on_answered_while_down(recheck)
    await reader.start()
    subscription, _ = reader.subscribe(None, ())
    try:
        breaker.record(False)  # the monitor finds PostgreSQL down, but the reader reaches it
        await commit_change(url, "display.theme", "dark")
        assert (await next_event(subscription.queue, 5)).key == "display.theme"
        assert open_at_dispatch == [False]
        assert rechecks == 1  # once the monitor finds it reachable, never again
    finally:
        await reader.stop("test over")
        pool.terminate()


async def test_a_snapshot_value_load_belongs_to_no_caller_and_gives_up_when_the_database_is_known_down(
    server_url: str, fresh_database: Any
) -> None:
    async with behind_relay(server_url, fresh_database) as (relay, pool, breaker, _url):

        async def read(conn: asyncpg.Connection) -> int:
            answer: int = await conn.fetchval("SELECT 42")
            return answer

        value: SnapshotValue[int] = SnapshotValue(pool, read, lambda: None)
        relay.cut()
        first = in_call(value.get, deadline_s=0.3)
        joined = in_call(value.get, deadline_s=10)
        # The first caller's deadline ends its own wait, not the load the other caller shares.
        with pytest.raises(CallDeadlineExceeded):
            await first
        assert not joined.done()
        breaker.record(False)
        began = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await joined
        with pytest.raises(DatabaseUnavailable):
            await in_call(value.get, deadline_s=10)
        assert time.monotonic() - began < AT_ONCE_S
        relay.heal()
        breaker.record(True)
        assert await in_call(value.get, deadline_s=5) == 42


async def test_a_layer_load_gives_up_on_its_connection_when_the_database_is_known_down(
    server_url: str, fresh_database: Any
) -> None:
    async with behind_relay(server_url, fresh_database) as (relay, pool, breaker, _url):

        async def read(conn: asyncpg.Connection, scopes: Sequence[Scope]) -> Mapping[Scope, int]:
            answer = await conn.fetchval("SELECT 7")
            return dict.fromkeys(scopes, answer)

        cache: ScopedCache[int] = ScopedCache(pool, read, name="preferences")
        scope = Scope(ScopeKind.USER, "u1")
        relay.cut()
        # Outside any call (a feed preparer's read, say): nothing but the breaker can end this load.
        loading = asyncio.create_task(cache.layers([scope]))
        await relay.until_stalled(1, 5)
        breaker.record(False)
        began = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(loading, 5)
        with pytest.raises(DatabaseUnavailable):
            await cache.layers([scope])
        assert time.monotonic() - began < AT_ONCE_S
        relay.heal()
        breaker.record(True)
        assert (await cache.layers([scope]))[scope].value == 7
