"""Preference types: definitions, stored and resolved values, writes and their outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from prefd_server.kernel.model import ALL_SCOPES, JsonValue, KeyChange, ResolvedValue, Scope, ScopeKind

MAX_WRITES_PER_CALL = 500
MAX_BATCH_SUBJECTS = 1000


class ValueType(enum.StrEnum):
    """The type every value of a definition must have."""

    BOOL = "bool"
    INT = "int"
    DOUBLE = "double"
    STRING = "string"
    ENUM = "enum"
    STRING_LIST = "string_list"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Definition:
    """A typed preference key with its default and constraints."""

    key: str
    category: str
    value_type: ValueType
    default: JsonValue
    description: str = ""
    allowed_values: tuple[JsonValue, ...] = ()
    min_value: float | None = None
    max_value: float | None = None
    max_length: int | None = None
    scopes: frozenset[ScopeKind] = ALL_SCOPES
    sensitive: bool = False
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    updated_by: str = ""


@dataclass(frozen=True, slots=True)
class CrossFieldRule:
    """The effective values of `non_decreasing`, in order, must each be <= the next."""

    id: str
    non_decreasing: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class StoredValue:
    """One override stored at a scope."""

    scope: Scope
    key: str
    value: JsonValue
    version: int
    updated_at: datetime
    updated_by: str


@dataclass(frozen=True, slots=True)
class KeyWrite:
    """One key to set (value) or remove (value is None) at a scope."""

    key: str
    value: JsonValue | None
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class ScopeWrite:
    """A validated write command: keys to set or remove at one scope, all or nothing."""

    scope: Scope
    writes: tuple[KeyWrite, ...]
    reason: str = ""
    # Resolve and check without storing.
    dry_run: bool = False
    # The org a USER scope resolves through ("" for none, and for other scopes).
    org_id: str = ""
    # Where the writes sit in the request, for field violations ("writes", "keys").
    field: str = "writes"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a write at one scope."""

    changes: list[KeyChange]
    effective: list[ResolvedValue] = field(default_factory=list)
    dry_run: bool = False
