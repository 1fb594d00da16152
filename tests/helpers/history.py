"""The independent history checker of the change feed: what one watcher received, checked against the
database's final state (every version of every watched key exactly once, in order, ending on the stored
value), and the pieces the feed and hosts tests share to record what their watchers receive."""

from __future__ import annotations

import abc
import asyncio
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from prefd.v1 import common_pb2
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.tokens import TokenKey
from tests.helpers.requests import py

KIND_NAMES = {
    common_pb2.SCOPE_KIND_GLOBAL: "GLOBAL",
    common_pb2.SCOPE_KIND_ORG: "ORG",
    common_pb2.SCOPE_KIND_USER: "USER",
}


def scope_of(pb: common_pb2.Scope) -> tuple[str, str]:
    """(kind name, id) of a Scope message, as the checker and preference_values name scopes."""
    return KIND_NAMES[pb.kind], pb.id


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types (True is not 1)."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Applied:
    """One preference change event as a watcher received it."""

    scope: tuple[str, str]  # (kind, id)
    key: str
    version: int
    value: Any  # None: the override was removed
    position: tuple[int, int]  # (xid, change id) decoded from the event's cursor

    @classmethod
    def received(cls, change: Any, position: tuple[int, int]) -> Applied:
        """A preferences ChangeEvent message as received, at `position` (its decoded cursor)."""
        value = py(change.new_value) if change.HasField("new_value") else None
        return cls(scope_of(change.scope), change.key, change.version, value, position)

    def raise_latest(self, latest: dict[tuple[str, str, str], int]) -> None:
        """Record this version in `latest` (the newest version seen per scope and key)."""
        name = (*self.scope, self.key)
        latest[name] = max(latest.get(name, 0), self.version)


class FeedWatch(abc.ABC):
    """A test's watch of the feed, run until it fails: the failure is kept in `stopped` and announced on
    `changed`, so a test waiting on the watch's progress sees it at once. Subclasses (dataclasses) hold
    these three attributes and follow the feed in _follow()."""

    tokens: TokenKey
    changed: asyncio.Condition
    stopped: BaseException | None

    def position(self, token: str) -> tuple[int, int]:
        """A cursor token's position in the feed: (xid, change id)."""
        cursor = FeedCursor.decode(token, self.tokens)
        return cursor.xid, cursor.change_id

    async def run(self) -> None:
        try:
            await self._follow()
        except BaseException as exc:
            self.stopped = exc
            async with self.changed:
                self.changed.notify_all()
            raise

    @abc.abstractmethod
    async def _follow(self) -> None:
        """Watch the feed until cancelled."""


def check_history(
    events: Sequence[Applied],
    final: Mapping[tuple[str, str, str], tuple[Any, int]],
    watched: set[tuple[str, str]],
) -> list[str]:
    """Everything wrong with one watcher's event history against the database's final state.

    `final` maps (scope kind, scope id, key) to (value or None if removed, version), as in
    preference_values. Every (scope, key) of a watched scope must arrive as versions 1..N exactly
    once each, in increasing order, in feed order overall, and end on the stored value.
    """
    problems: list[str] = []
    by_key: dict[tuple[str, str, str], list[Applied]] = {}
    previous: Applied | None = None
    for index, event in enumerate(events):
        if previous is not None and event.position <= previous.position:
            problems.append(f"event #{index} at {event.position} arrived after {previous.position} (feed order)")
        previous = event
        if event.scope not in watched:
            problems.append(f"event #{index} is at unwatched scope {event.scope}: {event.key} v{event.version}")
            continue
        by_key.setdefault((*event.scope, event.key), []).append(event)
    for name, seen in sorted(by_key.items()):
        versions = [e.version for e in seen]
        value, version = final.get(name, (None, 0))
        if versions != list(range(1, version + 1)):
            counts = Counter(versions)
            missing = sorted(set(range(1, version + 1)) - counts.keys())
            duplicated = sorted(v for v, n in counts.items() if n > 1)
            backwards = [(a, b) for a, b in itertools.pairwise(versions) if b <= a]
            beyond = sorted(v for v in counts if not 1 <= v <= version)
            problems.append(
                f"{name}: {len(versions)} versions for stored v{version}; missing {missing[:10]}, duplicated "
                f"{duplicated[:10]}, out of order {backwards[:5]}, unknown {beyond[:10]}"
            )
        elif not same(seen[-1].value, value):
            problems.append(f"{name}: last applied value {seen[-1].value!r}, stored {value!r}")
    for name, (_value, version) in sorted(final.items()):
        if (name[0], name[1]) in watched and name not in by_key:
            problems.append(f"{name}: stored at v{version} but never seen")
    return problems


async def dump_values(conn: asyncpg.Connection) -> dict[tuple[str, str, str], tuple[Any, int]]:
    """The database's final state for check_history: (scope kind, scope id, key) -> (value, version)."""
    rows = await conn.fetch("SELECT scope_kind, scope_id, key, value, version FROM preference_values")
    return {(r["scope_kind"], r["scope_id"], r["key"]): (r["value"], r["version"]) for r in rows}
