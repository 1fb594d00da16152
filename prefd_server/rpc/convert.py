"""Mapping between protobuf messages and domain objects (the only protobuf outside handlers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import ALL_SCOPES, ChangeKind, FieldViolation, JsonValue, Scope, ScopeKind, Subject
from prefd_server.kernel.tokens import TokenKey
from prefd_server.preferences.model import Definition, KeyChange, ResolvedValue, StoredValue, ValueType
from prefd_server.preferences.resolve import nest

_VALUE_TYPES = {
    common_pb2.VALUE_TYPE_BOOL: ValueType.BOOL,
    common_pb2.VALUE_TYPE_INT: ValueType.INT,
    common_pb2.VALUE_TYPE_DOUBLE: ValueType.DOUBLE,
    common_pb2.VALUE_TYPE_STRING: ValueType.STRING,
    common_pb2.VALUE_TYPE_ENUM: ValueType.ENUM,
    common_pb2.VALUE_TYPE_STRING_LIST: ValueType.STRING_LIST,
    common_pb2.VALUE_TYPE_JSON: ValueType.JSON,
}
_VALUE_TYPES_PB = {v: k for k, v in _VALUE_TYPES.items()}
_SCOPE_KINDS = {
    common_pb2.SCOPE_KIND_GLOBAL: ScopeKind.GLOBAL,
    common_pb2.SCOPE_KIND_ORG: ScopeKind.ORG,
    common_pb2.SCOPE_KIND_USER: ScopeKind.USER,
}
_SCOPE_KINDS_PB = {v: k for k, v in _SCOPE_KINDS.items()}


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
    return None if value is None else value_to_pb(value)


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as google.protobuf.Duration (to the nanosecond)."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def scope_from_pb(scope: common_pb2.Scope, field: str = "scope") -> Scope:
    """A validated domain Scope; INVALID_ARGUMENT for an unknown kind or a bad id."""
    kind = _SCOPE_KINDS.get(scope.kind)
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
    return common_pb2.Scope(kind=_SCOPE_KINDS_PB[scope.kind], id=scope.id)


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
    return common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id)


def provenance_to_pb(resolved: ResolvedValue) -> common_pb2.Provenance:
    return common_pb2.Provenance(
        layer=int(resolved.layer),  # type: ignore[arg-type]
        scope=scope_to_pb(resolved.scope) if resolved.scope else None,
        version=resolved.version,
        updated_at=timestamp(resolved.updated_at),
        updated_by=resolved.updated_by,
    )


def effective_to_pb(resolved: Sequence[ResolvedValue]) -> list[preferences_pb2.EffectiveValue]:
    return [
        preferences_pb2.EffectiveValue(key=r.key, value=value_to_pb(r.value), provenance=provenance_to_pb(r))
        for r in resolved
    ]


def nested_to_pb(resolved: Iterable[ResolvedValue]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(nest({r.key: r.value for r in resolved}))
    return struct


def change_to_pb(change: KeyChange) -> preferences_pb2.PreferenceChange:
    return preferences_pb2.PreferenceChange(
        key=change.key,
        old_value=optional_value_to_pb(change.old_value),
        new_value=optional_value_to_pb(change.new_value),
        old_version=change.old_version,
        new_version=change.new_version,
    )


def stored_to_pb(stored: StoredValue) -> preferences_pb2.StoredPreference:
    return preferences_pb2.StoredPreference(
        key=stored.key,
        value=value_to_pb(stored.value),
        version=stored.version,
        update_time=timestamp(stored.updated_at),
        updated_by=stored.updated_by,
    )


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
    return common_pb2.Cursor(token=cursor.encode(tokens))


def definition_from_pb(message: preferences_pb2.Definition, field: str = "definition") -> Definition:
    """A domain Definition from a request (output-only fields ignored); type errors are INVALID_ARGUMENT."""
    value_type = _VALUE_TYPES.get(message.type)
    if value_type is None:
        raise invalid(f"{field}.type", "must be one of VALUE_TYPE_BOOL .. VALUE_TYPE_JSON")
    scopes = set()
    for i, kind in enumerate(message.overridable_scopes):
        if kind not in _SCOPE_KINDS:
            raise invalid(f"{field}.overridable_scopes[{i}]", "unknown scope kind")
        scopes.add(_SCOPE_KINDS[kind])
    default = value_from_pb(message.default_value, f"{field}.default_value")
    if value_type is ValueType.DOUBLE and isinstance(default, int) and not isinstance(default, bool):
        default = float(default)
    return Definition(
        key=message.key,
        category=message.category,
        value_type=value_type,
        default=default,
        description=message.description,
        allowed_values=tuple(
            value_from_pb(v, f"{field}.allowed_values[{i}]") for i, v in enumerate(message.allowed_values)
        ),
        min_value=message.min_value if message.HasField("min_value") else None,
        max_value=message.max_value if message.HasField("max_value") else None,
        max_length=message.max_length if message.HasField("max_length") else None,
        scopes=frozenset(scopes) or ALL_SCOPES,
        sensitive=message.sensitive,
    )


def definition_to_pb(definition: Definition) -> preferences_pb2.Definition:
    return preferences_pb2.Definition(
        key=definition.key,
        category=definition.category,
        description=definition.description,
        type=_VALUE_TYPES_PB[definition.value_type],
        default_value=value_to_pb(definition.default),
        allowed_values=[value_to_pb(v) for v in definition.allowed_values],
        min_value=definition.min_value,
        max_value=definition.max_value,
        max_length=definition.max_length,
        overridable_scopes=[_SCOPE_KINDS_PB[s] for s in ScopeKind if s in definition.scopes],
        sensitive=definition.sensitive,
        version=definition.version,
        create_time=timestamp(definition.created_at),
        update_time=timestamp(definition.updated_at),
        updated_by=definition.updated_by,
    )


def change_event_to_pb(event: ChangeEvent, cursor: common_pb2.Cursor) -> preferences_pb2.ChangeEvent:
    """A feed row as a ChangeEvent (definition rows carry the default as old and new value)."""
    old, new = event.old_value, event.new_value
    if event.kind == ChangeKind.DEFINITION:
        kind = common_pb2.CHANGE_KIND_DEFINITION
        old = old.get("default") if isinstance(old, dict) else None
        new = new.get("default") if isinstance(new, dict) else None
    else:
        kind = common_pb2.CHANGE_KIND_PREFERENCE
    return preferences_pb2.ChangeEvent(
        kind=kind,
        scope=scope_to_pb(event.scope),
        key=event.key,
        old_value=optional_value_to_pb(old),
        new_value=optional_value_to_pb(new),
        version=event.version,
        actor=event.actor,
        change_time=timestamp(event.created_at),
        cursor=cursor,
    )
