"""Audit's domain types: change rows, listing filters, history points, key states and erasure counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, JsonValue, Scope
from prefd_server.kernel.privacy import ErasedRows


@dataclass(frozen=True, slots=True)
class AuditRow(ChangeEvent):
    """One change row with everything it records: the feed's event plus who, from where, and why."""

    peer: str
    user_agent: str
    reason: str
    request_id: str
    rollback_of: str

    def document(self) -> dict[str, Any]:
        """As JSON for an export."""
        return {
            "id": self.id,
            "kind": self.kind,
            "scope": str(self.scope),
            "key": self.key,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "time": self.created_at.isoformat(),
            "rollback_of": self.rollback_of,
        }


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """What ListChanges selects; every set field must match."""

    scope: Scope | None
    key_prefix: str
    kinds: tuple[ChangeKind, ...]
    actor: str
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True, slots=True)
class KeyState:
    """A key's value (None: absent) and version at a point, and the kind of its changes."""

    kind: ChangeKind
    value: JsonValue | None
    version: int


@dataclass(frozen=True, slots=True)
class Point:
    """A validated history point: just after a change, or a time."""

    change_id: int | None = None
    time: datetime | None = None

    def describe(self) -> str:
        return f"change {self.change_id}" if self.change_id is not None else f"time {self.time.isoformat()}"  # type: ignore[union-attr]

    def is_after(self, other: Point) -> bool:
        """Whether this point is later than `other` (False when one is a change and the other a time)."""
        if self.change_id is not None and other.change_id is not None:
            return self.change_id > other.change_id
        if self.time is not None and other.time is not None:
            return self.time > other.time
        return False


@dataclass(frozen=True, slots=True)
class ErasureCounts:
    """What an erasure did: overrides and AI configs deleted, change rows pseudonymised, other rows."""

    overrides: int
    ai_configs: int
    changes: int
    other_rows: int

    @classmethod
    def of(cls, erased: Sequence[ErasedRows], changes: int, other_rows: int) -> ErasureCounts:
        """The totals of the participants' erasures and the history's own (`changes`, `other_rows`)."""
        deleted: dict[str, int] = {}
        for rows in erased:
            for name, count in rows.deleted.items():
                deleted[name] = deleted.get(name, 0) + count
        overrides = deleted.pop("overrides", 0)
        ai_configs = deleted.pop("ai_configs", 0)
        other = other_rows + sum(rows.other for rows in erased) + sum(deleted.values())
        return cls(overrides, ai_configs, changes, other)

    @property
    def any(self) -> bool:
        return bool(self.overrides or self.ai_configs or self.changes or self.other_rows)

    def document(self) -> dict[str, int]:
        """What the erasure's change row records."""
        return {
            "overrides_deleted": self.overrides,
            "ai_configs_deleted": self.ai_configs,
            "changes_pseudonymised": self.changes,
        }
