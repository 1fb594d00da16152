"""Types every domain shares: scopes, subjects, layers, field violations and who made a call."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# A value as stored in jsonb: bool, int, float, str, list[str] or dict.
JsonValue = Any

MAX_KEY_LENGTH = 128
MAX_STRING_BYTES = 4 * 1024
MAX_JSON_BYTES = 64 * 1024


class ScopeKind(enum.StrEnum):
    """The layer an override is stored in."""

    GLOBAL = "GLOBAL"
    ORG = "ORG"
    USER = "USER"


ALL_SCOPES = frozenset(ScopeKind)


class ChangeKind(enum.StrEnum):
    """What a row of the change feed changed (its `kind` column)."""

    PREFERENCE = "preference"
    DEFINITION = "definition"
    AI_CONFIG = "ai_config"
    AI_MODEL = "ai_model"
    BUDGET = "budget"
    MAINTENANCE = "maintenance"
    ERASURE = "erasure"
    CONSENT = "consent"


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

# A scope as the in-process caches key it: (kind, id), a tuple of strings the garbage collector does not
# track, so caches of a million scopes add nothing to the work of a full collection.
ScopeKey = tuple[str, str]


def scope_key(scope: Scope) -> ScopeKey:
    return (scope.kind.value, scope.id)


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
class FieldViolation:
    """One invalid field: its path in the request and what is wrong."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who made a call and from where; recorded with every change."""

    actor: str
    peer: str = ""
    user_agent: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class RolloutAssignment:
    """Which variant of a rollout a subject got: its name, the bucket, out of how many, the salt and the
    id it was bucketed by ("user_id" or "org_id")."""

    variant: str
    bucket: int
    total_weight: int
    salt: str
    bucket_by: str


@dataclass(frozen=True, slots=True)
class Shadowed:
    """A stored override a policy above it kept from applying: where it is, its version, the scope whose
    policy shadowed it and the rule ("enforced", "max 3", "allowed ...")."""

    scope: Scope
    version: int
    policy_scope: Scope
    rule: str


@dataclass(frozen=True, slots=True)
class ResolvedValue:
    """One effective value with its provenance (and the rollout variant, when a rollout supplied it)."""

    key: str
    value: JsonValue
    layer: Layer
    scope: Scope | None
    version: int
    updated_at: datetime | None
    updated_by: str
    rollout: RolloutAssignment | None = None
    shadowed: tuple[Shadowed, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyChange:
    """What a write did to one key at one scope."""

    key: str
    old_value: JsonValue | None
    new_value: JsonValue | None
    old_version: int
    new_version: int
