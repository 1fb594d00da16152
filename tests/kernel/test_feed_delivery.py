"""How the feed hands changes on: the first watchers of a change run before the rest are woken, a watcher
joining mid-delivery misses nothing and gets nothing twice, and changes held behind the horizon by a
transaction in another database are re-checked soon after it ends rather than at the next poll."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from prefd.v1 import preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.feed import OFFER_CHUNK, Mailbox, Subscription
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import Scope, ScopeKind
from tests.helpers.auth import auth, unique
from tests.helpers.metrics import scrape
from tests.helpers.requests import org, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


async def test_the_first_watchers_run_before_the_rest_are_woken(app: App, channel: grpc.aio.Channel) -> None:
    assert app.feed is not None
    feed = app.feed
    org_id = unique("o")
    scope = Scope(ScopeKind.ORG, org_id)
    subscriptions = [feed.subscribe(frozenset({scope}), ())[0] for _ in range(3 * OFFER_CHUNK)]
    received: list[list[ChangeEvent]] = [[] for _ in subscriptions]
    first_woke: list[int] = []  # how many had been offered the change when the first watcher ran
    joined: list[Any] = []

    async def consume(index: int, subscription: Subscription) -> None:
        event = await subscription.queue.get()
        assert event is not None
        if not first_woke:
            first_woke.append(sum(1 for s in subscriptions if s.queue.qsize()) + sum(map(len, received)) + 1)
            joined.append(feed.subscribe(frozenset({scope}), ()))  # joins while the change is handed out
        received[index].append(event)

    consumers = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subscriptions)]
    try:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        await stub.SetPreferences(set_request(org(org_id), {"display.theme": "dark"}), metadata=ADMIN)
        async with asyncio.timeout(10):
            await asyncio.gather(*consumers)
        (event,) = {e.position: e for events in received for e in events}.values()
        assert all(len(events) == 1 for events in received)
        assert first_woke[0] <= OFFER_CHUNK < len(subscriptions)
        late, live_from = joined[0]
        # The late joiner starts after the change: what it was not offered lies at or before its start.
        assert live_from >= event.position
        assert late.queue.empty() or late.queue.get_nowait().position <= live_from
    finally:
        for task in consumers:
            task.cancel()
        for subscription in subscriptions + [j[0] for j in joined]:
            feed.unsubscribe(subscription)


async def test_a_change_held_by_another_databases_transaction_is_released_soon_after_it_ends(
    fresh_database: Any, tmp_path: Path
) -> None:
    url, elsewhere = await fresh_database(), await fresh_database()
    # A fallback poll far longer than the test: only the re-check can deliver the held change.
    settings = make_settings(url, tmp_path, feed_poll_interval_s=60.0, metrics_port=0, metrics_host="127.0.0.1")
    async with App(settings) as app:
        assert app.feed is not None
        feed = app.feed
        uid = unique("u")
        scope = Scope(ScopeKind.USER, uid)
        subscription, _ = feed.subscribe(frozenset({scope}), ())
        other = await asyncpg.connect(elsewhere)
        try:
            held = other.transaction()
            await held.start()
            await other.fetchval("SELECT pg_current_xact_id()")  # an xid below every later one, cluster-wide
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
                await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
            deadline = time.monotonic() + 10
            while feed.held_since is None:  # the reader knows a committed change waits behind the horizon
                assert time.monotonic() < deadline, "the held change was never noticed"
                await asyncio.sleep(0.01)
            assert subscription.queue.empty()
            # Operators see it: the age of the oldest change held back.
            assert (await asyncio.to_thread(scrape, app.metrics_port))["prefd_feed_horizon_held_seconds"] > 0
            await held.commit()  # wakes no prefd reader: no NOTIFY, another database
            async with asyncio.timeout(5):
                event = await subscription.queue.get()
            assert event is not None and event.scope == scope and event.new_value == "dark"
        finally:
            await other.close()
            feed.unsubscribe(subscription)


async def test_a_mailbox_hands_items_over_in_order_and_keeps_nothing_while_empty() -> None:
    box: Mailbox[int] = Mailbox()
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0)  # the consumer now waits on an empty mailbox
    assert not waiting.done() and box.empty() and box.qsize() == 0
    for item in (1, 2, 3):
        box.put_nowait(item)
    assert await waiting == 1
    assert [await box.get(), box.get_nowait()] == [2, 3]
    assert box.empty() and box._items is None  # drained: no buffer kept
    with pytest.raises(asyncio.QueueEmpty):
        box.get_nowait()
    cancelled = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    box.put_nowait(4)  # a cancelled wait leaves no waiter behind to swallow the next item
    assert await box.get() == 4


async def test_a_watcher_that_falls_behind_its_capacity_is_ended_not_buffered_without_bound(
    fresh_database: Any, tmp_path: Path
) -> None:
    url = await fresh_database()
    async with App(make_settings(url, tmp_path, watch_queue_capacity=2)) as app:
        assert app.feed is not None
        uid = unique("u")
        subscription, _ = app.feed.subscribe(frozenset({Scope(ScopeKind.USER, uid)}), ())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
                for n in range(1, 5):
                    await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": n}), metadata=ADMIN)
            # Nothing is taken until the feed has offered every write (it delivers after the writes return).
            db = await asyncpg.connect(url)
            try:
                row = await db.fetchrow(
                    "SELECT xid::text::bigint AS xid, id FROM changes WHERE scope_id = $1 ORDER BY id DESC LIMIT 1", uid
                )
            finally:
                await db.close()
            assert await app.feed.wait_past(FeedCursor(row["xid"], row["id"]), timeout_s=10)
            first, second, end = [subscription.queue.get_nowait() for _ in range(3)]
            assert [first.new_value, second.new_value] == [1, 2]  # type: ignore[union-attr]
            assert end is None and subscription.overflowed and subscription.queue.empty()
        finally:
            app.feed.unsubscribe(subscription)
