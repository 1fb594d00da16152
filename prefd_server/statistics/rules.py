"""Pure rules of the statistics: the deltas a batch of changes makes (old value -1, new value +1), and
the daily rollups of a date range from the stored rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.model import ChangeKind, ScopeKind
from prefd_server.statistics.model import ALL_KINDS, ALL_ORGS, HIDDEN, Counted, DayRow

# (scope_kind, scope_id, key): one stored override.
Slot = tuple[str, str, str]
# (key, org_id or ALL_ORGS, scope_kind or ALL_KINDS): the holders of a key in one group of scopes.
Group = tuple[str, str, str]
# (key, org_id or ALL_ORGS, scope_kind or ALL_KINDS, value_hash): the holders of one value in a group.
GroupValue = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class FeedRow:
    """The part of a change row the statistics need; value_hash/value_json are None for a removal; org_id
    is the org the change counts in (ALL_ORGS: none)."""

    id: int
    xid: int
    kind: str
    scope_kind: str
    scope_id: str
    key: str
    version: int
    value_hash: str | None
    value_json: str | None
    day: date
    org_id: str = ALL_ORGS

    @property
    def position(self) -> FeedCursor:
        return FeedCursor(self.xid, self.id)


@dataclass(slots=True)
class Plan:
    """Everything one batch (or one erasure) changes, as net deltas and rows to write."""

    # GroupValue -> holders delta; value_hash -> its JSON when first seen.
    values: dict[GroupValue, int] = field(default_factory=lambda: defaultdict(int))
    value_json: dict[str, str] = field(default_factory=dict)
    # Group -> holders delta.
    holders: dict[Group, int] = field(default_factory=lambda: defaultdict(int))
    counted: dict[Slot, Counted] = field(default_factory=dict)  # rows to upsert
    uncounted: set[Slot] = field(default_factory=set)  # rows to delete (erased users)
    users_seen: set[str] = field(default_factory=set)
    users_erased: set[str] = field(default_factory=set)
    # (key, day) -> changes that day; key -> the day its figures are snapshotted for.
    changes: dict[tuple[str, date], int] = field(default_factory=lambda: defaultdict(int))
    snapshot_days: dict[str, date] = field(default_factory=dict)
    applied: int = 0
    erasures: int = 0

    def nonzero_values(self) -> dict[GroupValue, int]:
        return {k: d for k, d in self.values.items() if d}

    def nonzero_holders(self) -> dict[Group, int]:
        return {k: d for k, d in self.holders.items() if d}

    def _count(self, key: str, scope_kind: str, counted: Counted, delta: int) -> None:
        """`delta` holders of a counted value in every group its scope belongs to: its kind and all kinds,
        among every scope and (when it has one) within its org."""
        value_hash = counted.value_hash
        assert value_hash is not None
        orgs = (ALL_ORGS, counted.org_id) if counted.org_id != ALL_ORGS else (ALL_ORGS,)
        for org in orgs:
            for kind in (scope_kind, ALL_KINDS):
                self.holders[(key, org, kind)] += delta
                if value_hash != HIDDEN:
                    self.values[(key, org, kind, value_hash)] += delta


class Planner:
    """Applies changes in feed order to the counted rows they touch, recording the deltas in a Plan."""

    def __init__(self, counted: Mapping[Slot, Counted], sensitive: Mapping[str, bool]) -> None:
        self._counted = dict(counted)
        self._by_scope: dict[tuple[str, str], set[str]] = defaultdict(set)
        for scope_kind, scope_id, key in self._counted:
            self._by_scope[(scope_kind, scope_id)].add(key)
        self._sensitive = sensitive
        self.plan = Plan()

    def preference(self, row: FeedRow) -> None:
        """A set or removal: the old counted value -1, the new one +1, unless already counted."""
        plan = self.plan
        plan.changes[(row.key, row.day)] += 1
        plan.snapshot_days[row.key] = row.day
        if row.scope_kind == ScopeKind.USER:
            plan.users_seen.add(row.scope_id)
        slot = (row.scope_kind, row.scope_id, row.key)
        held = self._counted.get(slot)
        # Versions of one key grow in feed order; a version already counted (replay after a rebuild
        # from a snapshot) changes nothing.
        if held is not None and row.version <= held.version:
            return
        new_hash = None
        if row.value_hash is not None:
            new_hash = HIDDEN if self._sensitive.get(row.key, True) else row.value_hash
            if new_hash != HIDDEN and row.value_json is not None:
                plan.value_json.setdefault(new_hash, row.value_json)
        if held is not None and held.value_hash is not None:
            plan._count(row.key, row.scope_kind, held, -1)
        counted = self._counted[slot] = Counted(new_hash, row.version, row.org_id if new_hash is not None else ALL_ORGS)
        if new_hash is not None:
            plan._count(row.key, row.scope_kind, counted, +1)
        self._by_scope[(row.scope_kind, row.scope_id)].add(row.key)
        plan.counted[slot] = counted
        plan.uncounted.discard(slot)
        plan.applied += 1

    def erase(self, scope_kind: str, scope_id: str, day: date) -> None:
        """A user left: every value counted for its scope -1, its rows and its known-user entry go."""
        plan = self.plan
        for key in sorted(self._by_scope.pop((scope_kind, scope_id), set())):
            slot = (scope_kind, scope_id, key)
            held = self._counted.pop(slot)
            if held.value_hash is not None:
                plan._count(key, scope_kind, held, -1)
            plan.snapshot_days[key] = day
            plan.counted.pop(slot, None)
            plan.uncounted.add(slot)
        plan.users_erased.add(scope_id)
        plan.erasures += 1

    def apply(self, rows: Iterable[FeedRow]) -> Plan:
        """Every change of a batch, in feed order (rows of other kinds count nothing)."""
        for row in rows:
            if row.kind == ChangeKind.PREFERENCE:
                self.preference(row)
            elif row.kind == ChangeKind.ERASURE and row.scope_kind == ScopeKind.USER:
                self.erase(row.scope_kind, row.scope_id, row.day)
        return self.plan


def erased_scopes(rows: Sequence[FeedRow]) -> list[str]:
    """The USER scope ids a batch's erasure rows name."""
    return [r.scope_id for r in rows if r.kind == ChangeKind.ERASURE and r.scope_kind == ScopeKind.USER]


def touched_slots(rows: Sequence[FeedRow]) -> list[Slot]:
    """The (scope, key) of every preference change of a batch, once each."""
    return list(dict.fromkeys((r.scope_kind, r.scope_id, r.key) for r in rows if r.kind == ChangeKind.PREFERENCE))


@dataclass(frozen=True, slots=True)
class Writes:
    """A plan's figures as rows: value rows to update, insert (with their JSON) and delete (at 0 holders),
    key rows to update and insert, each with absolute holders."""

    values_updated: list[tuple[str, str, str, str, int]]
    values_inserted: list[tuple[str, str, str, str, str, int]]
    values_deleted: list[tuple[str, str, str, str]]
    keys_updated: list[tuple[str, str, str, int, int]]
    keys_inserted: list[tuple[str, str, str, int, int]]


def writes_of(
    plan: Plan,
    values_before: Mapping[GroupValue, int],
    keys_before: Mapping[Group, tuple[int, int]],
) -> Writes:
    """The rows a plan's deltas make of the figures it touches (holders before: the rows that exist). A
    value reaching 0 holders is deleted and no longer counts as a distinct value; one going up from 0 does."""
    updated: list[tuple[str, str, str, str, int]] = []
    inserted: list[tuple[str, str, str, str, str, int]] = []
    deleted: list[tuple[str, str, str, str]] = []
    distinct: dict[Group, int] = defaultdict(int)
    for (key, org, kind, value_hash), delta in sorted(plan.nonzero_values().items()):
        before = values_before.get((key, org, kind, value_hash))
        after = (before or 0) + delta
        if after < 0:
            raise ValueError(f"holders of a value of {key} at {kind} in {org!r} would fall below 0")
        if before is None:
            if after:
                inserted.append((key, org, kind, value_hash, plan.value_json.get(value_hash, ""), after))
                distinct[(key, org, kind)] += 1
        elif after == 0:
            deleted.append((key, org, kind, value_hash))
            distinct[(key, org, kind)] -= 1
        else:
            updated.append((key, org, kind, value_hash, after))
    keys_updated: list[tuple[str, str, str, int, int]] = []
    keys_inserted: list[tuple[str, str, str, int, int]] = []
    for group in sorted(set(plan.nonzero_holders()) | {k for k, d in distinct.items() if d}):
        holders, values = keys_before.get(group, (0, 0))
        key, org, kind = group
        row = (key, org, kind, holders + plan.holders.get(group, 0), values + distinct.get(group, 0))
        if row[3] < 0 or row[4] < 0:
            raise ValueError(f"holders of {key} at {kind} in {org!r} would fall below 0")
        (keys_updated if group in keys_before else keys_inserted).append(row)
    return Writes(updated, inserted, deleted, keys_updated, keys_inserted)


def rollup_days(start: date, end: date, rows: Sequence[DayRow], before: DayRow | None) -> list[DayRow]:
    """One row per day of [start, end]: the stored row of that day, else the state the last stored
    row before it left (no changes that day), else zeros."""
    stored = {row.day: row for row in rows}
    days = []
    last = before
    day = start
    while day <= end:
        row = stored.get(day)
        if row is not None:
            last = row
        elif last is not None:
            row = DayRow(day, 0, last.holders, last.users, last.most_common)
        else:
            row = DayRow(day, 0, 0, 0, None)
        days.append(row)
        day += timedelta(days=1)
    return days
