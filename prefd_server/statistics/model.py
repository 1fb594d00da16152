"""Statistics types: what the consumer counts per (scope, key), the figures read back, and refusals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

from prefd_server.kernel.errors import Code, PrefdError
from prefd_server.kernel.model import FieldViolation, ScopeKind

# The scope_kind of the rows that add up every kind.
ALL_KINDS = "*"
# The org_id of the rows that count every scope, whatever its org.
ALL_ORGS = ""
# The counted value of a sensitive key's override: held, value not kept.
HIDDEN = ""
DEFAULT_TOP_N = 10
MAX_TOP_N = 100
MAX_ROLLUP_DAYS = 366


@dataclass(frozen=True, slots=True)
class Counted:
    """What the statistics count for one stored (scope, key): the value's hash (HIDDEN for a sensitive
    key, None when the override was removed), the per-key version that reflects, and the org it is
    counted in (ALL_ORGS: none)."""

    value_hash: str | None
    version: int
    org_id: str = ALL_ORGS


@dataclass(frozen=True, slots=True)
class ValueCount:
    """One value of a key (canonical JSON) and how many scopes hold it."""

    value_json: str
    holders: int


@dataclass(frozen=True, slots=True)
class KeyFigures:
    """Holders of a key per scope kind (and ALL_KINDS), distinct values at the counted kind, top values."""

    holders_by_kind: dict[str, int]
    distinct_values: int
    top: list[ValueCount]


@dataclass(frozen=True, slots=True)
class Popular:
    """A key's holders at the counted kind(s) and its most held value (None: nobody, or not kept)."""

    key: str
    holders: int
    most_common: ValueCount | None


@dataclass(frozen=True, slots=True)
class AdoptionFigures:
    """USER-scope holders of a key, those holding the default's value, and the known users."""

    users_overriding: int
    users_at_default: int
    known_users: int


@dataclass(frozen=True, slots=True)
class DayRow:
    """A stored daily row: the day's changes and the state after the day's last applied change."""

    day: date
    changes: int
    holders: int
    users: int
    most_common: ValueCount | None


@dataclass(slots=True)
class BatchOutcome:
    """What one applied batch did (for logs, the rebuild command and tests)."""

    events: int = 0
    counted: int = 0
    erasures: int = 0
    keys: set[str] = field(default_factory=set)


def scope_kind_column(kind: ScopeKind | None) -> str:
    """The scope_kind column value that selects `kind` (None: every kind)."""
    return ALL_KINDS if kind is None else kind.value


class KeyNotFound(PrefdError):
    """No definition has the key statistics were asked for."""

    code = Code.NOT_FOUND
    reason = "DEFINITION_NOT_FOUND"

    def __init__(self, key: str, field: str = "key") -> None:
        super().__init__(f"definition {key!r} does not exist", key=key)
        self._field = field

    @property
    def violations(self) -> Sequence[FieldViolation]:
        return (FieldViolation(self._field, "no definition has this key"),)


class CategoryNotFound(PrefdError):
    """No definition has the category statistics were asked for."""

    code = Code.NOT_FOUND
    reason = "CATEGORY_NOT_FOUND"

    def __init__(self, category: str) -> None:
        super().__init__(f"no definition has category {category!r}", category=category)

    @property
    def violations(self) -> Sequence[FieldViolation]:
        return (FieldViolation("category", "no definition has this category"),)


class SensitiveValues(PrefdError):
    """Values were asked for a sensitive key: its statistics are counts only."""

    code = Code.FAILED_PRECONDITION
    reason = "SENSITIVE_KEY"

    def __init__(self, key: str, field: str) -> None:
        super().__init__(f"{key!r} is sensitive: its statistics are counts only", key=key)
        self._field = field

    @property
    def violations(self) -> Sequence[FieldViolation]:
        return (FieldViolation(self._field, "must be 0 for a sensitive key (counts only, never values)"),)
