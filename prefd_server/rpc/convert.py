"""Protobuf mapping of the types every domain shares: scopes, subjects, typed values, cursors, times, reasons."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import (
    FieldViolation,
    JsonValue,
    KeyChange,
    ResolvedValue,
    RolloutAssignment,
    Scope,
    ScopeKind,
    Subject,
)
from prefd_server.kernel.tokens import TokenKey

# Scope kinds by their protobuf enum value, and back.
SCOPE_KINDS = {
    common_pb2.SCOPE_KIND_GLOBAL: ScopeKind.GLOBAL,
    common_pb2.SCOPE_KIND_ORG: ScopeKind.ORG,
    common_pb2.SCOPE_KIND_USER: ScopeKind.USER,
}
SCOPE_KINDS_PB = {v: k for k, v in SCOPE_KINDS.items()}


MAX_REASON_LENGTH = 1024


def check_reason(reason: str, required: bool = False) -> str:
    """A write's `reason`: at most MAX_REASON_LENGTH characters, and not blank where it is required."""
    if required and not reason.strip():
        raise invalid("reason", "is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise invalid("reason", f"must be at most {MAX_REASON_LENGTH} characters")
    return reason


def value_from_pb(value: common_pb2.TypedValue, field: str) -> JsonValue:
    """A TypedValue as a JSON-compatible Python value; INVALID_ARGUMENT when unset."""
    which = value.WhichOneof("kind")
    if which is None:
        raise invalid(field, "a value is required (bool_value, int_value, double_value, string_value, ...)")
    if which == "string_list_value":
        return list(value.string_list_value.values)
    if which == "json_value":
        return json_format.MessageToDict(value.json_value)
    return getattr(value, which)


def value_to_pb(value: JsonValue) -> common_pb2.TypedValue:
    """A stored value as a TypedValue (bool, int, double, string, string list or JSON object)."""
    if isinstance(value, bool):
        return common_pb2.TypedValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.TypedValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.TypedValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.TypedValue(string_value=value)
    if isinstance(value, list):
        return common_pb2.TypedValue(string_list_value=common_pb2.StringList(values=[str(v) for v in value]))
    struct = struct_pb2.Struct()
    struct.update(value)
    return common_pb2.TypedValue(json_value=struct)


def optional_value_to_pb(value: JsonValue | None) -> common_pb2.TypedValue | None:
    """value_to_pb, or None (the field left unset) for no value."""
    return None if value is None else value_to_pb(value)


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as google.protobuf.Duration (to the nanosecond)."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A datetime as google.protobuf.Timestamp; None stays None (the field left unset)."""
    if moment is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def scope_from_pb(scope: common_pb2.Scope, field: str = "scope") -> Scope:
    """A validated domain Scope; INVALID_ARGUMENT for an unknown kind or a bad id."""
    kind = SCOPE_KINDS.get(scope.kind)
    if kind is None:
        raise invalid(f"{field}.kind", "must be SCOPE_KIND_GLOBAL, SCOPE_KIND_ORG or SCOPE_KIND_USER")
    if kind is ScopeKind.GLOBAL:
        if scope.id:
            raise invalid(f"{field}.id", "must be empty for GLOBAL")
        return Scope(kind, "")
    problem = id_problem(scope.id)
    if problem:
        raise invalid(f"{field}.id", problem)
    return Scope(kind, scope.id)


def scope_to_pb(scope: Scope) -> common_pb2.Scope:
    """A domain Scope as common_pb2.Scope."""
    return common_pb2.Scope(kind=SCOPE_KINDS_PB[scope.kind], id=scope.id)


def subject_from_pb(subject: common_pb2.Subject, field: str, default_org: str = "") -> Subject:
    """A validated Subject; an empty org_id takes `default_org`."""
    violations = []
    problem = id_problem(subject.user_id)
    if problem:
        violations.append(FieldViolation(f"{field}.user_id", problem))
    org = subject.org_id or default_org
    if org and (problem := id_problem(org)):
        violations.append(FieldViolation(f"{field}.org_id", problem))
    if violations:
        raise ValidationFailed(violations)
    return Subject(subject.user_id, org)


def subject_to_pb(subject: Subject) -> common_pb2.Subject:
    """A domain Subject as common_pb2.Subject."""
    return common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id)


class CursorField:
    """The serialized `cursor` field of a response type, memoised per feed position (appended to
    prebuilt bodies on hot read paths)."""

    def __init__(self, response_type: Any, tokens: TokenKey) -> None:
        self._response_type = response_type
        self._tokens = tokens
        self._memo: tuple[FeedCursor | None, bytes] = (None, b"")

    def __call__(self, position: FeedCursor) -> bytes:
        memo = self._memo[0]
        if memo is not position and memo != position:
            encoded = self._response_type(cursor=cursor_to_pb(position, self._tokens)).SerializeToString()
            self._memo = (position, encoded)
        return self._memo[1]


def cursor_to_pb(cursor: FeedCursor, tokens: TokenKey) -> common_pb2.Cursor:
    """A feed position as an opaque, signed common_pb2.Cursor."""
    return common_pb2.Cursor(token=cursor.encode(tokens))


def provenance_to_pb(resolved: ResolvedValue) -> common_pb2.Provenance:
    """Where an effective value came from: its layer, scope, version and last write."""
    return common_pb2.Provenance(
        layer=int(resolved.layer),  # type: ignore[arg-type]
        scope=scope_to_pb(resolved.scope) if resolved.scope else None,
        version=resolved.version,
        updated_at=timestamp(resolved.updated_at),
        updated_by=resolved.updated_by,
        rollout=_assignment_to_pb(resolved.rollout) if resolved.rollout is not None else None,
        shadowed=[
            common_pb2.ShadowedOverride(
                scope=scope_to_pb(s.scope), version=s.version, policy_scope=scope_to_pb(s.policy_scope), rule=s.rule
            )
            for s in resolved.shadowed
        ],
    )


def _assignment_to_pb(assignment: RolloutAssignment) -> common_pb2.RolloutAssignment:
    bucket_by = (
        common_pb2.ROLLOUT_BUCKET_BY_ORG_ID
        if assignment.bucket_by == "org_id"
        else common_pb2.ROLLOUT_BUCKET_BY_USER_ID
    )
    return common_pb2.RolloutAssignment(
        variant=assignment.variant,
        bucket=assignment.bucket,
        total_weight=assignment.total_weight,
        salt=assignment.salt,
        bucket_by=bucket_by,
    )


def effective_to_pb(resolved: Sequence[ResolvedValue]) -> list[preferences_pb2.EffectiveValue]:
    """Effective values with their provenance, in the given order."""
    return [
        preferences_pb2.EffectiveValue(key=r.key, value=value_to_pb(r.value), provenance=provenance_to_pb(r))
        for r in resolved
    ]


def change_to_pb(change: KeyChange) -> preferences_pb2.PreferenceChange:
    """What a write did to one key."""
    return preferences_pb2.PreferenceChange(
        key=change.key,
        old_value=optional_value_to_pb(change.old_value),
        new_value=optional_value_to_pb(change.new_value),
        old_version=change.old_version,
        new_version=change.new_version,
    )
