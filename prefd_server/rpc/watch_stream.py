"""The Watch* stream edge shared by domains: the start cursor in, kernel watch items out as response messages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from prefd.v1 import common_pb2
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import invalid
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.tokens import TokenKey
from prefd_server.kernel.watch import Change, Compacted, Erased, Progress, Started, WatchItem
from prefd_server.rpc.convert import cursor_to_pb

R = TypeVar("R")
M = TypeVar("M")  # what a change becomes: a message like R, or its serialized bytes
_CURSOR = "cursor"


def shared_cursor(event: ChangeEvent, tokens: TokenKey) -> common_pb2.Cursor:
    """The event's cursor, sealed once however many watchers it goes to (read-only: copy, never edit)."""
    cursor: common_pb2.Cursor | None = event.shared.get(_CURSOR)
    if cursor is None:
        cursor = event.shared[_CURSOR] = cursor_to_pb(event.position, tokens)
    return cursor


def start_cursor(request: Any, tokens: TokenKey) -> FeedCursor | None:
    """The decoded `start_cursor` of a Watch* request; None when unset, INVALID_ARGUMENT when not a valid cursor."""
    if not request.HasField("start_cursor"):
        return None
    try:
        return FeedCursor.decode(request.start_cursor.token, tokens)
    except ValueError as exc:
        raise invalid("start_cursor", str(exc)) from exc


async def watch_responses(
    items: AsyncIterator[WatchItem],
    response_type: Callable[..., R],
    tokens: TokenKey,
    change: Callable[[ChangeEvent, common_pb2.Cursor], Awaitable[M]],
) -> AsyncIterator[R | M]:
    """Each watch item as one message of `response_type` (a Watch*Response with the common oneof).

    Started, Progress, Compacted and Erased become its `started`, `progress`, `compacted` and
    `erased` fields (common_pb2.WatchStarted ... WatchErased) with the item's cursor; a change
    becomes whatever `change(event, cursor of the event)` returns, the domain's own message (or its
    serialized bytes, which the middleware sends as they are).
    """
    async for item in items:
        if type(item) is Change:  # the common case first
            yield await change(item.event, shared_cursor(item.event, tokens))
        elif isinstance(item, Started):
            yield response_type(started=common_pb2.WatchStarted(cursor=cursor_to_pb(item.cursor, tokens)))
        elif isinstance(item, Progress):
            yield response_type(progress=common_pb2.WatchProgress(cursor=cursor_to_pb(item.cursor, tokens)))
        elif isinstance(item, Compacted):
            yield response_type(compacted=common_pb2.WatchCompacted(oldest_cursor=cursor_to_pb(item.oldest, tokens)))
        elif isinstance(item, Erased):
            yield response_type(erased=common_pb2.WatchErased(cursor=cursor_to_pb(item.position, tokens)))
