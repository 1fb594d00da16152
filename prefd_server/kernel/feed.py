"""The change-feed reader: one per process, tails `changes` gap-free and fans out to watchers and caches.

The reader returns rows after its position whose transaction is below the snapshot horizon
(pg_snapshot_xmin): every transaction below it has finished, so no row can later appear behind
the position. It wakes on a local write, on a LISTEN notification from another process, or
after a short poll, whichever comes first. The horizon is cluster-wide: a transaction open in any
database of the same PostgreSQL holds it, and its end wakes no one; so while committed changes are
known to wait behind the horizon the reader re-checks soon (RECHECK_FIRST_S, doubling up to the poll
interval) rather than at the next poll.

No wait of the reader outlasts a partition by much: a statement, or a wait for a connection, is given
up after READ_TIMEOUT_S, after READ_TIMEOUT_DOWN_S while the health monitor finds PostgreSQL down,
and as soon as the monitor changes its mind; a connection given up on is terminated, so the next
read runs on a fresh one (one the outage hung would answer only at TCP's next retransmission). A read
that succeeds while the monitor still finds PostgreSQL down asks it to check again at once, before the
changes go on to watchers (who would read the database, refused while it is held down).

A batch reaches listeners (caches forget what it makes stale) first, then preparers (which compute
once what many watchers' deliveries share, such as the layer a change touched), then subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

import asyncpg

from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import breaker_of, horizon_xid, terminated_if
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "prefd_changes"
BATCH = 2000
# First re-check while changes wait behind the horizon (seconds); it doubles up to the poll interval.
RECHECK_FIRST_S = 0.002
# Subscribers offered a change before the reader lets the ones offered so far run (and send) ahead of
# the rest: the first watchers of an org-wide change hear it without waiting for the thousandth to wake.
OFFER_CHUNK = 64
# Longest wait for preparers before subscribers get a batch anyway (they then do the work themselves).
PREPARE_TIMEOUT_S = 1.0
# Longest wait of the reader on one statement or for a connection (seconds), and while the health monitor
# finds PostgreSQL down (the reader then tries fresh connections rather than wait on one the outage hung).
READ_TIMEOUT_S = 5.0
READ_TIMEOUT_DOWN_S = 0.5


class Bookmark:
    """Queued to an idle subscription: nothing was offered to it for its progress interval."""


T = TypeVar("T")


class Mailbox(Generic[T]):
    """A queue for one consumer that holds nothing while empty (asyncio.Queue keeps three deques and an
    Event, about 3 KB, for each of what may be 10,000 idle watchers)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[T] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle watcher keeps no buffer
        return item

    async def get(self) -> T:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()


BOOKMARK = Bookmark()
# Bookmark checks run this often, as a share of the shortest progress interval subscribed.
BOOKMARK_TICKS_PER_INTERVAL = 4


@dataclass(eq=False)
class Subscription:
    """One watcher's share of the feed: matching events queue up until the watcher takes them; a
    BOOKMARK is queued when nothing was offered for `progress_interval_s` (no timer per watcher)."""

    scopes: frozenset[Scope] | None  # None: every scope
    key_prefixes: tuple[str, ...]
    capacity: int
    progress_interval_s: float | None = None
    queue: Mailbox[ChangeEvent | Bookmark | None] = field(default_factory=Mailbox)
    overflowed: bool = False
    closed_reason: str = ""
    offered_at: float = field(default_factory=time.monotonic)

    def matches(self, event: ChangeEvent) -> bool:
        if self.scopes is not None and event.scope not in self.scopes:
            return False
        return not self.key_prefixes or event.kind == ChangeKind.ERASURE or event.key.startswith(self.key_prefixes)

    def offer(self, event: ChangeEvent, now: float) -> None:
        self.offered_at = now
        if self.overflowed:
            return
        if self.queue.qsize() >= self.capacity:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)

    def bookmark_due(self, now: float) -> bool:
        """Queue a BOOKMARK if the subscription has been idle for its progress interval; whether it did."""
        interval = self.progress_interval_s
        if interval is None or now - self.offered_at < interval or not self.queue.empty():
            return False
        self.offered_at = now
        self.queue.put_nowait(BOOKMARK)
        return True

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self.queue.put_nowait(None)


ChangeListener = Callable[[Sequence[ChangeEvent]], None]
# Called with the events of a batch that have subscribers, before they see them.
ChangePreparer = Callable[[Sequence[ChangeEvent]], Awaitable[None]]


class WakeupNotifier:
    """Coalesces "something committed" into at most one NOTIFY in flight, outside any write transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prefd-feed-notify")

    def notify(self) -> None:
        self._pending.set()

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                async with self._pool.acquire() as conn:
                    await feed_sql.notify(conn, NOTIFY_CHANNEL)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("feed wake-up notify failed: %s", exc)
                await asyncio.sleep(0.5)  # back off while the database is away; readers still poll

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class FeedReader:
    """Tails the change table for this process; subscribers and listeners get every change once, in order."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, poll_interval_s: float, subscriber_capacity: int) -> None:
        self._pool = pool
        self._breaker = breaker_of(pool)
        self._answered_while_down: Callable[[], Awaitable[object]] | None = None
        self._dsn = dsn
        self._poll_interval_s = poll_interval_s
        self._capacity = subscriber_capacity
        self._wake = asyncio.Event()
        self._listen_conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._bookmarks: asyncio.Task[None] | None = None
        self._subscriptions: set[Subscription] = set()
        self._by_scope: dict[Scope, set[Subscription]] = {}
        self._all_scopes: set[Subscription] = set()
        self._listeners: list[ChangeListener] = []
        self._preparers: list[ChangePreparer] = []
        self._advanced = asyncio.Condition()
        self.position = FeedCursor(0, 0)
        # The end of the batch being offered (the position once it is): where a new subscriber starts.
        self._offering_through = self.position
        self.lag_ms = 0.0  # commit-to-dispatch time of the newest change dispatched
        self.last_read_monotonic = 0.0
        # When the oldest change committed behind the horizon was made, as of the last read (None: none waits).
        self.held_since: datetime | None = None
        self.healthy = False

    async def start(self) -> None:
        """Start from the current horizon (nothing before it is replayed to listeners)."""
        async with self._pool.acquire() as conn:
            self.position = FeedCursor.at_horizon(await horizon_xid(conn))
        self.last_read_monotonic = time.monotonic()
        self.healthy = True
        await self._listen()
        self._task = asyncio.create_task(self._run(), name="prefd-feed-reader")
        self._bookmarks = asyncio.create_task(self._bookmark_idle(), name="prefd-feed-bookmarks")

    async def stop(self, reason: str) -> None:
        """End every subscription with `reason` and stop reading."""
        for subscription in list(self._subscriptions):
            subscription.close(reason)
        for task in (self._task, self._bookmarks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._bookmarks = None
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await self._listen_conn.close()
            self._listen_conn = None

    def add_listener(self, listener: ChangeListener) -> None:
        """Call `listener` with each batch of changes, before subscribers see them."""
        self._listeners.append(listener)

    def add_preparer(self, preparer: ChangePreparer) -> None:
        """Await `preparer` with the watched events of each batch before subscribers see them (at most
        PREPARE_TIMEOUT_S; a preparer that fails only costs the watchers doing that work themselves)."""
        self._preparers.append(preparer)

    def on_answered_while_down(self, hook: Callable[[], Awaitable[object]]) -> None:
        """Await `hook` (the health monitor's re-check) when the reader reaches PostgreSQL while the pool's
        breaker is open, before the changes it read go on: watchers woken by them read the database."""
        self._answered_while_down = hook

    def wake(self) -> None:
        """A local write committed: read now."""
        self._wake.set()

    def subscribe(
        self, scopes: frozenset[Scope] | None, key_prefixes: Sequence[str], progress_interval_s: float | None = None
    ) -> tuple[Subscription, FeedCursor]:
        """Register a watcher; it receives every matching change after the returned position, and a
        BOOKMARK whenever nothing was offered to it for `progress_interval_s` (None: never)."""
        subscription = Subscription(scopes, tuple(key_prefixes), self._capacity, progress_interval_s)
        self._subscriptions.add(subscription)
        if scopes is None:
            self._all_scopes.add(subscription)
        else:
            for scope in scopes:
                self._by_scope.setdefault(scope, set()).add(subscription)
        # Joining while a batch is offered: the batch may already have passed it, so it starts after it.
        return subscription, max(self.position, self._offering_through)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        self._all_scopes.discard(subscription)
        for scope in subscription.scopes or ():
            members = self._by_scope.get(scope)
            if members is not None:
                members.discard(subscription)
                if not members:
                    del self._by_scope[scope]

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    async def wait_past(self, cursor: FeedCursor, timeout_s: float) -> bool:
        """Wait until the reader's position is at or past `cursor`; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s), self._advanced:
                await self._advanced.wait_for(lambda: self.position >= cursor)
            return True
        except TimeoutError:
            return False

    async def _listen(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self._dsn, timeout=READ_TIMEOUT_S)
            with terminated_if(conn, None, READ_TIMEOUT_S):
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
            conn.add_termination_listener(lambda _c: self._wake.set())
            self._listen_conn = conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("feed LISTEN unavailable (%s); polling only", exc)
            if conn is not None:
                conn.terminate()
            self._listen_conn = None

    async def _run(self) -> None:
        delay = self._poll_interval_s
        recheck: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                held = await self._catch_up()
                # While changes wait behind the horizon: re-check after 2, 4, 8 ... ms, up to the poll interval.
                if not held:
                    recheck = None
                else:
                    recheck = RECHECK_FIRST_S if recheck is None else min(recheck * 2, self._poll_interval_s)
                delay = recheck or self._poll_interval_s
                self.healthy = True
                if self._listen_conn is None or self._listen_conn.is_closed():
                    await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if self.healthy:
                    log.warning("feed reader cannot read the change table: %s", exc)
                self.healthy = False
                await asyncio.sleep(self._poll_interval_s)  # retry pace while the database is away

    async def _bookmark_idle(self) -> None:
        """Queue bookmarks to idle subscriptions, checking a few times per shortest progress interval."""
        while True:
            intervals = [s.progress_interval_s for s in self._subscriptions if s.progress_interval_s is not None]
            await asyncio.sleep(min(intervals, default=1.0) / BOOKMARK_TICKS_PER_INTERVAL)
            now = time.monotonic()
            for subscription in list(self._subscriptions):
                subscription.bookmark_due(now)

    def _database_down(self) -> bool:
        """Whether the health monitor finds PostgreSQL down (the pool's breaker is open)."""
        return self._breaker is not None and self._breaker.is_open

    def _read_timeout_s(self) -> float:
        return READ_TIMEOUT_DOWN_S if self._database_down() else READ_TIMEOUT_S

    def _monitor_changed_mind(self) -> Callable[[], bool]:
        """A test that holds once the health monitor's finding is no longer what it is now: PostgreSQL went
        down under a read, or is back while a read begun during the outage hangs on a connection from it."""
        down = self._database_down()
        return lambda: self._database_down() != down

    async def _catch_up(self) -> bool:
        """Read everything below the horizon; whether committed changes still wait behind it."""
        async with self._pool.acquire(timeout=self._read_timeout_s()) as conn:
            while True:
                with terminated_if(conn, self._monitor_changed_mind(), self._read_timeout_s()):
                    horizon, held_since = await feed_sql.horizon(conn)
                    events = await feed_sql.read_after(conn, self.position, horizon, BATCH)
                if self._database_down() and self._answered_while_down is not None:
                    await self._answered_while_down()
                if events:
                    await self._dispatch(events)
                if len(events) < BATCH:
                    self.position = max(self.position, FeedCursor.at_horizon(horizon))
                    break
        self.held_since = held_since
        self.last_read_monotonic = time.monotonic()
        async with self._advanced:
            self._advanced.notify_all()
        return held_since is not None

    async def _dispatch(self, events: Sequence[ChangeEvent]) -> None:
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # a listener's bug must not stop the feed for everyone
                log.exception("feed listener failed")
        await self._prepare(events)
        await self._offer(events)

    async def _prepare(self, events: Sequence[ChangeEvent]) -> None:
        if not self._preparers:
            return
        watched = events if self._all_scopes else [e for e in events if e.scope in self._by_scope]
        if not watched:
            return
        try:
            async with asyncio.timeout(PREPARE_TIMEOUT_S):
                await asyncio.gather(*(preparer(watched) for preparer in self._preparers))
        except Exception as exc:  # subscribers still get the batch; each does the work it needs itself
            log.warning("feed preparer failed: %s", exc)

    async def _offer(self, events: Sequence[ChangeEvent]) -> None:
        self._offering_through = events[-1].position
        offered = 0
        now = time.monotonic()
        for event in events:
            for subscription in (*self._by_scope.get(event.scope, ()), *self._all_scopes):
                if subscription.matches(event):
                    subscription.offer(event, now)
                    offered += 1
                    if offered % OFFER_CHUNK == 0:
                        await asyncio.sleep(0)
        self.position = events[-1].position
        newest = events[-1].created_at.timestamp()
        self.lag_ms = max(0.0, (time.time() - newest) * 1000)
