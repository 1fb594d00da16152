"""Domain types shared by the store, the validation rules and the services (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# A preference value as stored in jsonb: bool, int, float, str, list[str] or dict.
JsonValue = Any

MAX_KEY_LENGTH = 128
MAX_STRING_BYTES = 4 * 1024
MAX_JSON_BYTES = 64 * 1024
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


class ScopeKind(enum.StrEnum):
    """The layer an override is stored in."""

    GLOBAL = "GLOBAL"
    ORG = "ORG"
    USER = "USER"


ALL_SCOPES = frozenset(ScopeKind)


class Layer(enum.IntEnum):
    """Where an effective value came from, least to most specific."""

    DEFAULT = 1
    ENV = 2
    GLOBAL = 3
    ORG = 4
    USER = 5


@dataclass(frozen=True, slots=True)
class Scope:
    """Where an override lives: GLOBAL (id ""), ORG(id) or USER(id)."""

    kind: ScopeKind
    id: str = ""

    def __str__(self) -> str:
        return self.kind.value if self.kind is ScopeKind.GLOBAL else f"{self.kind.value}({self.id})"


GLOBAL_SCOPE = Scope(ScopeKind.GLOBAL, "")


@dataclass(frozen=True, slots=True)
class Subject:
    """Who effective configuration is resolved for."""

    user_id: str
    org_id: str = ""

    def layers(self) -> list[tuple[Layer, Scope]]:
        """The scopes that apply to this subject, least specific first."""
        scopes = [(Layer.GLOBAL, GLOBAL_SCOPE)]
        if self.org_id:
            scopes.append((Layer.ORG, Scope(ScopeKind.ORG, self.org_id)))
        scopes.append((Layer.USER, Scope(ScopeKind.USER, self.user_id)))
        return scopes


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
class ResolvedValue:
    """One effective value with its provenance."""

    key: str
    value: JsonValue
    layer: Layer
    scope: Scope | None
    version: int
    updated_at: datetime | None
    updated_by: str


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field: its path in the request and what is wrong."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class KeyWrite:
    """One key to set (value) or remove (value is None) at a scope."""

    key: str
    value: JsonValue | None
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class KeyChange:
    """What a write did to one key at one scope."""

    key: str
    old_value: JsonValue | None
    new_value: JsonValue | None
    old_version: int
    new_version: int


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who made a call and from where; recorded with every change."""

    actor: str
    peer: str = ""
    user_agent: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a write at one scope."""

    changes: list[KeyChange]
    effective: list[ResolvedValue] = field(default_factory=list)
    dry_run: bool = False
