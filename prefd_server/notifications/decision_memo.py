"""Prepared decisions remembered for the questions that will be asked again, bounded in bytes and dropped
as soon as a setting, definition or consent they read changes (this process's commits and the feed).

A decision depends on the subject's resolved notification settings and consents (which change only
through commits and the feed, both heard here), the event's type, category, priority, candidate
channels and time, and of the event's data only the values its rule's conditions read. So a decision
is remembered under the event without its data plus those values (the paths come from a second entry,
per subject and event type, remembered and dropped alongside), and answers until the first instant at
which its schedule or a consent could decide otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from prefd_server.kernel.bounded_cache import CacheBudget
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.conditions import values_at
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import GLOBAL_SCOPE, ChangeKind, Scope, Subject
from prefd_server.kernel.response_cache import ResponseCache
from prefd_server.notifications.model import Event

P = TypeVar("P")  # what is remembered: a prepared answer

# Condition values longer than this (as JSON) are not remembered: such a decision is made afresh.
MAX_REMEMBERED_VALUES_BYTES = 1024
# The change kinds a decision reads: settings, their definitions, consents; an erasure may touch any.
_KINDS = (ChangeKind.PREFERENCE, ChangeKind.DEFINITION, ChangeKind.CONSENT, ChangeKind.ERASURE)


def _scopes(subject: Subject) -> tuple[Scope, ...]:
    return tuple(scope for _, scope in subject.layers())


class DecisionMemo(Generic[P]):
    """Prepared answers by (subject, event without data, the condition values read), each valid until a
    given time; `tick` grows with every change heard, so an answer built across a change is not kept."""

    def __init__(self, commits: LocalCommits, budget: CacheBudget | int | None = None) -> None:
        """`budget`: the process's cache budget (this memo takes its shares), or bytes for the answers
        (an eighth more for the condition paths)."""
        paths_budget = budget // 8 if isinstance(budget, int) else budget
        self._entries: ResponseCache[tuple[P, float]] = ResponseCache("notifications.decisions", budget)
        self._paths: ResponseCache[tuple[str, ...]] = ResponseCache("notifications.decision_paths", paths_budget)
        self.tick = 0
        for kind in _KINDS:
            scoped = kind in (ChangeKind.PREFERENCE, ChangeKind.CONSENT)
            commits.add_listener(kind, self._committed if scoped else self._all_committed)

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: drop what the changes make stale."""
        for event in events:
            if event.kind in (ChangeKind.PREFERENCE, ChangeKind.CONSENT):
                self._drop(event.scope)
            elif event.kind in (ChangeKind.DEFINITION, ChangeKind.ERASURE):
                self._drop(GLOBAL_SCOPE)

    def _committed(self, scope: Scope, xid: int) -> None:
        self._drop(scope)

    def _all_committed(self, scope: Scope, xid: int) -> None:
        self._drop(GLOBAL_SCOPE)

    def _drop(self, scope: Scope) -> None:
        self.tick += 1
        self._entries.drop(scope)
        self._paths.drop(scope)

    # --- reads and writes ---------------------------------------------------------------

    def key(self, subject: Subject, event: Event, at_given: bool) -> Hashable | None:
        """The key a decision for `subject` and `event` is remembered under (None: not known yet, or the
        condition values are too large to remember)."""
        question = (subject.user_id, subject.org_id, event.event_type)
        paths = self._paths.get(question)
        if paths is None:
            return None
        values = _values(event, paths)
        if values is None:
            return None
        return (*question, event.category, event.priority, event.channels, event.at if at_given else None, values)

    def get(self, key: Hashable, now_s: float) -> P | None:
        """The answer remembered under `key` if it still holds at `now_s` (Unix seconds)."""
        entry = self._entries.get(key)
        if entry is None or now_s >= entry[1]:
            return None
        return entry[0]

    def put(
        self,
        subject: Subject,
        event: Event,
        at_given: bool,
        paths: Iterable[str],
        answer: tuple[P, int, float],
        since_tick: int,
    ) -> None:
        """Remember `answer` = (prepared, its size in bytes, valid until Unix seconds) for a decision begun at
        `since_tick` whose rule's conditions read `paths`, unless a change was heard since."""
        if self.tick != since_tick:
            return
        prepared, size, until_s = answer
        question = (subject.user_id, subject.org_id, event.event_type)
        scopes = _scopes(subject)
        ordered = tuple(sorted(paths))
        self._paths.put(question, ordered, scopes, size=sum(len(p) for p in ordered))
        key = self.key(subject, event, at_given)
        if key is not None and until_s > 0:
            self._entries.put(key, (prepared, until_s), scopes, size=size)

    @property
    def bytes(self) -> int:
        return self._entries.bytes + self._paths.bytes


def _values(event: Event, paths: tuple[str, ...]) -> str | None:
    """The event data's values at `paths`, as one canonical string (None when too large to remember)."""
    if not paths:
        return ""
    # repr tells apart every JSON value (strings quoted, numbers exact); objects whose keys come in another
    # order read as different values, which only costs a decision made afresh.
    text = repr(values_at(event.data, paths))
    return text if len(text) <= MAX_REMEMBERED_VALUES_BYTES else None


def valid_until_s(*instants_s: float | None) -> float:
    """The earliest of the given instants (Unix seconds; None: never), infinity when all are None."""
    return min((i for i in instants_s if i is not None), default=math.inf)
