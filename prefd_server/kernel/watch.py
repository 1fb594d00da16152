"""A watch session: replay history from a cursor, then follow the live feed, with bookmarks while idle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import ServerStopping, WatchOverflow, invalid
from prefd_server.kernel.feed import Bookmark, FeedReader
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, ScopeKind, Subject
from prefd_server.kernel.tokens import TokenKey

HISTORY_PAGE = 1000
WATCHED_KINDS = frozenset({ChangeKind.PREFERENCE, ChangeKind.DEFINITION})


@dataclass(frozen=True, slots=True)
class Started:
    cursor: FeedCursor


@dataclass(frozen=True, slots=True)
class Change:
    event: ChangeEvent


@dataclass(frozen=True, slots=True)
class Progress:
    cursor: FeedCursor


@dataclass(frozen=True, slots=True)
class Compacted:
    oldest: FeedCursor


@dataclass(frozen=True, slots=True)
class Erased:
    """The watched user's data was erased; the stream ends."""

    position: FeedCursor


WatchItem = Started | Change | Progress | Compacted | Erased


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """What a watch follows: a subject's scopes, or one scope."""

    scopes: frozenset[Scope]
    key_prefixes: tuple[str, ...]
    subject: Subject | None = None
    # The USER scope an erasure of the subject is recorded at (its pseudonym): only `erasure` counts there.
    erased_scope: Scope | None = None

    @classmethod
    def for_subject(cls, subject: Subject, key_prefixes: Sequence[str], pseudonym: str = "") -> WatchTarget:
        scopes = {scope for _, scope in subject.layers()}
        erased = Scope(ScopeKind.USER, pseudonym) if pseudonym else None
        if erased is not None:
            scopes.add(erased)
        return cls(frozenset(scopes), tuple(key_prefixes), subject, erased)

    @classmethod
    def for_scope(cls, scope: Scope, key_prefixes: Sequence[str]) -> WatchTarget:
        return cls(frozenset({scope}), tuple(key_prefixes))


async def watch(
    feed: FeedReader,
    pool: asyncpg.Pool,
    target: WatchTarget,
    start: FeedCursor | None,
    progress_interval_s: float,
    tokens: TokenKey,
    kinds: frozenset[str] = WATCHED_KINDS,
) -> AsyncIterator[WatchItem]:
    """Every matching change of `kinds` after `start` (or after now), once each, in feed order."""
    subscription, live_from = feed.subscribe(target.scopes, target.key_prefixes, progress_interval_s)
    try:
        last = live_from
        if start is not None:
            async with translated_errors(), pool.acquire() as conn:
                compacted = await feed_sql.compacted_through(conn)
                if compacted is not None and start < compacted:
                    yield Compacted(compacted)
                    return
                if start.xid > await feed_sql.next_xid(conn):
                    raise invalid("start_cursor", "is ahead of the change feed")
            last = start
        yield Started(last)
        if start is not None and start < live_from:
            async for event in _history(pool, target, start, live_from, kinds | {ChangeKind.ERASURE}):
                if event.scope == target.erased_scope:
                    if event.kind == ChangeKind.ERASURE:
                        yield Erased(event.position)
                        return
                    continue
                if event.kind == ChangeKind.ERASURE:
                    continue
                yield Change(event)
            last = live_from
        while True:
            queued = await subscription.queue.get()
            if isinstance(queued, Bookmark):
                # An event may have been queued behind the bookmark: the bookmark must not pass it.
                if subscription.queue.empty():
                    yield Progress(max(last, feed.position))
                continue
            if queued is None:
                if subscription.overflowed:
                    raise WatchOverflow("watcher fell behind; resume from its cursor", cursor=last.encode(tokens))
                raise ServerStopping(subscription.closed_reason or "server stopping", cursor=last.encode(tokens))
            position = queued.position
            if position <= last:
                continue
            if queued.kind == ChangeKind.ERASURE and queued.scope == target.erased_scope:
                yield Erased(position)
                return
            if queued.kind not in kinds or queued.scope == target.erased_scope:
                continue
            last = position
            yield Change(queued)
    finally:
        feed.unsubscribe(subscription)


async def _history(
    pool: asyncpg.Pool, target: WatchTarget, after: FeedCursor, through: FeedCursor, kinds: frozenset[str]
) -> AsyncIterator[ChangeEvent]:
    while True:
        async with translated_errors(), pool.acquire() as conn:
            page = await feed_sql.read_range(
                conn, after, through, sorted(target.scopes, key=str), target.key_prefixes, HISTORY_PAGE
            )
        for event in page:
            if event.kind in kinds:
                yield event
        if len(page) < HISTORY_PAGE:
            return
        after = page[-1].position
