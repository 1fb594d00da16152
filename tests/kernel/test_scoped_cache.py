"""The scoped cache's freshness rules against real snapshots: a read begun before a change is never
kept nor joined by later readers, and an older read never replaces a newer one nor backs a response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from prefd_server.kernel.change_marks import MAX_MARKS, ChangeMarks
from prefd_server.kernel.db import horizon_xid
from prefd_server.kernel.model import Scope, ScopeKind
from prefd_server.kernel.scoped_cache import ScopedCache

SCOPE = Scope(ScopeKind.USER, "u-scoped-cache")


class GatedReads:
    """A reader whose every read waits for its own gate; each read's value is its number (1, 2, ...)."""

    def __init__(self) -> None:
        self.count = 0
        self.started: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def __call__(self, conn: asyncpg.Connection, scopes: Sequence[Scope]) -> dict[Scope, int]:
        self.count += 1
        number = self.count
        gate = asyncio.Event()
        await self.started.put(gate)
        await gate.wait()
        return dict.fromkeys(scopes, number)

    async def next_started(self) -> asyncio.Event:
        return await asyncio.wait_for(self.started.get(), 10)


@pytest.fixture
async def pool(fresh_database: Any) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(await fresh_database(), min_size=1, max_size=4)
    try:
        yield created
    finally:
        created.terminate()  # a failed test may leave a read waiting at its gate, holding a connection


async def committed_xid(pool: asyncpg.Pool) -> int:
    """The xid of a transaction committed now (every snapshot taken before saw it running or not at all)."""
    xid: int = await pool.fetchval("SELECT pg_current_xact_id()::text::bigint")
    return xid


async def horizon_past(pool: asyncpg.Pool, xmin: int) -> None:
    """Commit transactions until a new snapshot's horizon is past `xmin`."""
    async with asyncio.timeout(10), pool.acquire() as conn:
        while await horizon_xid(conn) <= xmin:
            await committed_xid(pool)


async def test_a_read_begun_before_a_change_is_never_kept_nor_joined(pool: asyncpg.Pool) -> None:
    reads = GatedReads()
    cache: ScopedCache[int] = ScopedCache(pool, reads, name="preferences")
    since = cache.tick
    first = asyncio.ensure_future(cache.layers([SCOPE]))
    first_gate = await reads.next_started()
    cache.forget(SCOPE, await committed_xid(pool))  # the scope changed after the first read's snapshot

    second = asyncio.ensure_future(cache.layers([SCOPE]))
    second_gate = await reads.next_started()  # a reader after the change starts its own read
    first_gate.set()
    stale = (await first)[SCOPE]
    assert stale.value == 1  # answered to its own caller
    cache.store_response("body", {SCOPE: stale.xmin}, since, b"stale")
    assert cache.response("body") is None
    second_gate.set()
    assert (await second)[SCOPE].value == 2

    assert (await cache.layers([SCOPE]))[SCOPE].value == 2  # the fresh read was kept, the stale one not
    assert reads.count == 2


async def test_an_older_read_never_replaces_a_newer_one_nor_backs_a_response(pool: asyncpg.Pool) -> None:
    reads = GatedReads()
    cache: ScopedCache[int] = ScopedCache(pool, reads, name="preferences")
    older = asyncio.ensure_future(cache.layers([SCOPE]))
    older_gate = await reads.next_started()
    cache.forget(SCOPE, 1)  # a change every snapshot has seen: detaches the pending read, leaves it fresh
    async with pool.acquire() as conn:
        await horizon_past(pool, await horizon_xid(conn))

    newer = asyncio.ensure_future(cache.layers([SCOPE]))
    (await reads.next_started()).set()
    newest = (await newer)[SCOPE]
    older_gate.set()
    old = (await older)[SCOPE]
    assert (old.value, newest.value) == (1, 2)
    assert old.xmin < newest.xmin

    assert (await cache.layers([SCOPE]))[SCOPE] == newest
    since = cache.tick
    cache.store_response("old", {SCOPE: old.xmin}, since, b"old")
    cache.store_response("new", {SCOPE: newest.xmin}, since, b"new")
    assert (cache.response("old"), cache.response("new")) == (None, b"new")


async def test_a_snapshot_value_read_before_its_change_is_not_kept(pool: asyncpg.Pool) -> None:
    reads = GatedReads()
    cache: ScopedCache[int] = ScopedCache(pool, reads, name="preferences")
    value = cache.snapshot_value(lambda conn: reads(conn, [SCOPE]))
    cache.store_response("body", {}, cache.tick, b"body")
    first = asyncio.ensure_future(value.get())
    first_gate = await reads.next_started()
    value.forget(await committed_xid(pool))
    assert cache.response("body") is None  # a change of the value drops every response
    first_gate.set()
    assert (await first)[SCOPE] == 1
    assert value.value is None

    second = asyncio.ensure_future(value.get())
    (await reads.next_started()).set()
    assert (await second)[SCOPE] == 2
    assert value.value == {SCOPE: 2}


async def test_concurrent_misses_are_read_together_each_scope_once(pool: asyncpg.Pool) -> None:
    """A cold process under load: 300 readers of 100 scopes at once make a handful of loads, not 300."""
    reads = GatedReads()
    cache: ScopedCache[int] = ScopedCache(pool, reads, name="preferences")
    scopes = [Scope(ScopeKind.USER, f"u-cold-{n}") for n in range(100)]
    readers = [asyncio.create_task(cache.layers([scopes[n % 100]])) for n in range(300)]
    everyone = asyncio.gather(*readers)
    opened = []
    async with asyncio.timeout(20):
        while not everyone.done():
            started = asyncio.ensure_future(reads.started.get())
            await asyncio.wait({started, everyone}, return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                opened.append(started.result())
                opened[-1].set()
            else:
                started.cancel()
    found = [next(iter(layers.values())).value for layers in everyone.result()]
    assert reads.count == len(opened) <= 3
    # Each scope's readers got the one value its load read.
    by_scope: dict[int, set[int]] = {}
    for n, value in enumerate(found):
        by_scope.setdefault(n % 100, set()).add(value)
    assert all(len(values) == 1 for values in by_scope.values())


def test_change_marks_are_bounded_and_a_mark_let_go_early_stands_for_every_scope() -> None:
    marks = ChangeMarks()
    for n in range(MAX_MARKS + 10):
        marks.raise_to(("USER", f"u{n}"), 1000 + n, tick=n)
    assert len(marks) == MAX_MARKS
    # The ten oldest went before their time: the newest of them now holds for every scope.
    assert marks.get(("USER", "u0")) is None
    assert marks.everywhere == 1009 and marks.everywhere_tick == MAX_MARKS + 9
    marks.raise_to(("USER", "u20"), 5, tick=1)
    assert marks.get(("USER", "u20")) == (1020, 1)  # a mark never goes down


def test_floors_let_go_by_count_once_the_feed_has_long_passed_them_stand_for_nothing() -> None:
    floors = ChangeMarks(matters_for_s=0.0)
    for n in range(MAX_MARKS + 10):
        floors.raise_to(("USER", f"u{n}"), 1000 + n, tick=n)
    assert len(floors) == MAX_MARKS and floors.everywhere == 0
