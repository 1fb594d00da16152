"""Protobuf mapping of preferences: definitions, write commands, changes, stored and effective values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf import field_mask_pb2, struct_pb2

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import (
    ALL_SCOPES,
    ChangeKind,
    FieldViolation,
    JsonValue,
    ResolvedValue,
    Scope,
    ScopeKind,
)
from prefd_server.preferences.model import Definition, KeyWrite, ScopeWrite, StoredValue, ValueType, WriteResult
from prefd_server.preferences.policy import MAX_ALLOWED_VALUES, Policy, is_policy
from prefd_server.preferences.policy import from_json as policy_from_json
from prefd_server.preferences.resolve import nest
from prefd_server.preferences.rollout import (
    MAX_VARIANTS,
    Algorithm,
    BucketBy,
    Rollout,
    Variant,
    is_rollout,
    shape_problems,
)
from prefd_server.preferences.rollout import from_json as rollout_from_json
from prefd_server.preferences.rules import check_key_list, definition_violations, write_org
from prefd_server.rpc.convert import (
    SCOPE_KINDS,
    SCOPE_KINDS_PB,
    change_to_pb,
    check_reason,
    effective_to_pb,
    optional_value_to_pb,
    scope_to_pb,
    timestamp,
    value_from_pb,
    value_to_pb,
)

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

# Definition fields an update_mask may name.
MUTABLE_DEFINITION_FIELDS = (
    "category",
    "description",
    "type",
    "default_value",
    "default_rollout",
    "allowed_values",
    "min_value",
    "max_value",
    "max_length",
    "overridable_scopes",
    "sensitive",
)


# --- requests in ---------------------------------------------------------------------------------


def set_request_to_write(
    request: preferences_pb2.SetPreferencesRequest, scope: Scope, caller_org: str, is_admin: bool
) -> ScopeWrite:
    """The validated write command of a SetPreferences request at its (parsed) scope.

    The org a USER write resolves through is the request's `org_id` (an admin's choice) or the
    caller's own org.
    """
    check_reason(request.reason)
    check_key_list([w.key for w in request.writes], "writes")
    writes = tuple(
        KeyWrite(
            w.key, _written_value(w, f"writes[{i}]"), w.expected_version if w.HasField("expected_version") else None
        )
        for i, w in enumerate(request.writes)
    )
    org_id = write_org(request.org_id, scope.kind, caller_org, is_admin)
    return ScopeWrite(scope, writes, request.reason, request.dry_run, org_id)


def delete_request_to_write(
    request: preferences_pb2.DeletePreferencesRequest, scope: Scope, caller_org: str
) -> ScopeWrite:
    """The validated write command of a DeletePreferences request: remove each named key at its scope."""
    check_reason(request.reason)
    check_key_list(list(request.keys), "keys")
    org_id = caller_org if scope.kind is ScopeKind.USER else ""
    writes = tuple(KeyWrite(k, None) for k in request.keys)
    return ScopeWrite(scope, writes, request.reason, org_id=org_id, field="keys")


def definition_from_pb(message: preferences_pb2.Definition, field: str = "definition") -> Definition:
    """A domain Definition from a request (output-only fields ignored); type errors are INVALID_ARGUMENT."""
    value_type = _VALUE_TYPES.get(message.type)
    if value_type is None:
        raise invalid(f"{field}.type", "must be one of VALUE_TYPE_BOOL .. VALUE_TYPE_JSON")
    scopes = set()
    for i, kind in enumerate(message.overridable_scopes):
        if kind not in SCOPE_KINDS:
            raise invalid(f"{field}.overridable_scopes[{i}]", "unknown scope kind")
        scopes.add(SCOPE_KINDS[kind])
    rollout = message.default_rollout if message.HasField("default_rollout") else None
    default = _value_or_rollout(message.default_value, rollout, field, "default_value", "default_rollout")
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


def valid_definition_from_pb(message: preferences_pb2.Definition) -> Definition:
    """definition_from_pb, then every definition rule; ValidationFailed lists what is wrong."""
    definition = definition_from_pb(message)
    violations = definition_violations(definition)
    if violations:
        raise ValidationFailed(violations)
    return definition


def update_paths(request: preferences_pb2.UpdateDefinitionRequest) -> list[str]:
    """The fields an UpdateDefinition request replaces: its mask's paths, or every mutable field."""
    paths = list(request.update_mask.paths) or list(MUTABLE_DEFINITION_FIELDS)
    unknown = [p for p in paths if p not in MUTABLE_DEFINITION_FIELDS]
    if unknown:
        raise ValidationFailed([FieldViolation("update_mask.paths", f"{p!r} cannot be updated") for p in unknown])
    return paths


def updated_definition(
    request: preferences_pb2.UpdateDefinitionRequest, paths: Sequence[str], current: Definition
) -> Definition:
    """The validated definition an UpdateDefinition request leaves: `current` with the fields
    named by `paths` (see update_paths) taken from the request."""
    merged = definition_to_pb(current)
    # A default is a value or a rollout: replacing one replaces the other.
    if "default_value" in paths and "default_rollout" not in paths:
        merged.ClearField("default_rollout")
    if "default_rollout" in paths and "default_value" not in paths:
        merged.ClearField("default_value")
    mask = field_mask_pb2.FieldMask(paths=paths)
    mask.MergeMessage(request.definition, merged, replace_message_field=True, replace_repeated_field=True)
    return valid_definition_from_pb(merged)


def _written_value(write: preferences_pb2.PreferenceWrite, field: str) -> JsonValue:
    """What a PreferenceWrite stores: its value or rollout, with its policy when it has one."""
    value = _value_or_rollout(write.value, write.rollout if write.HasField("rollout") else None, field, "value")
    if not write.HasField("policy"):
        return value
    message = write.policy
    allowed = tuple(
        value_from_pb(v, f"{field}.policy.allowed_values[{i}]") for i, v in enumerate(message.allowed_values)
    )
    if len(allowed) > MAX_ALLOWED_VALUES:
        raise invalid(f"{field}.policy.allowed_values", f"must have at most {MAX_ALLOWED_VALUES} values")
    return Policy(
        value,
        enforced=message.enforced,
        min_value=message.min_value if message.HasField("min_value") else None,
        max_value=message.max_value if message.HasField("max_value") else None,
        allowed=allowed,
    ).to_json()


def policy_to_pb(policy: Policy) -> preferences_pb2.Policy:
    """A stored policy as a Policy message."""
    return preferences_pb2.Policy(
        enforced=policy.enforced,
        min_value=policy.min_value,
        max_value=policy.max_value,
        allowed_values=[value_to_pb(v) for v in policy.allowed],
    )


def _value_or_rollout(
    value: common_pb2.TypedValue,
    rollout: common_pb2.Rollout | None,
    field: str,
    value_name: str,
    rollout_name: str = "rollout",
) -> JsonValue:
    """The value a request sets: its TypedValue, or its rollout in stored form (one of the two)."""
    if rollout is None:
        return value_from_pb(value, f"{field}.{value_name}")
    if value.WhichOneof("kind") is not None:
        raise invalid(f"{field}.{rollout_name}", f"set {value_name} or {rollout_name}, not both")
    return rollout_from_pb(rollout, f"{field}.{rollout_name}").to_json()


def rollout_from_pb(message: common_pb2.Rollout, field: str) -> Rollout:
    """A Rollout from a request; its shape and values are checked with the key's definition."""
    bucket_by = _BUCKET_BY.get(message.bucket_by)
    if bucket_by is None:
        raise invalid(f"{field}.bucket_by", "must be USER_ID or ORG_ID")
    if message.algorithm not in (
        common_pb2.ROLLOUT_ALGORITHM_UNSPECIFIED,
        common_pb2.ROLLOUT_ALGORITHM_FLAGD_FRACTIONAL_V2,
    ):
        raise invalid(f"{field}.algorithm", "must be ROLLOUT_ALGORITHM_FLAGD_FRACTIONAL_V2")
    if len(message.variants) > MAX_VARIANTS:
        raise invalid(f"{field}.variants", f"must have at most {MAX_VARIANTS} variants")
    variants = tuple(
        Variant(v.name, value_from_pb(v.value, f"{field}.variants[{i}].value"), v.weight)
        for i, v in enumerate(message.variants)
    )
    rollout = Rollout(variants, message.salt, bucket_by, Algorithm.FLAGD_FRACTIONAL_V2)
    problems = shape_problems(rollout)
    if problems:
        raise ValidationFailed([FieldViolation(f"{field}.{where}", problem) for where, problem in problems])
    return rollout


def rollout_to_pb(stored: JsonValue) -> common_pb2.Rollout:
    """A stored rollout envelope as a Rollout message."""
    rollout = rollout_from_json(stored)
    return common_pb2.Rollout(
        variants=[
            common_pb2.RolloutVariant(name=v.name, value=value_to_pb(v.value), weight=v.weight)
            for v in rollout.variants
        ],
        salt=rollout.salt,
        bucket_by=_BUCKET_BY_PB[rollout.bucket_by],
        algorithm=common_pb2.ROLLOUT_ALGORITHM_FLAGD_FRACTIONAL_V2,
    )


_BUCKET_BY = {
    common_pb2.ROLLOUT_BUCKET_BY_UNSPECIFIED: BucketBy.USER_ID,
    common_pb2.ROLLOUT_BUCKET_BY_USER_ID: BucketBy.USER_ID,
    common_pb2.ROLLOUT_BUCKET_BY_ORG_ID: BucketBy.ORG_ID,
}
_BUCKET_BY_PB = {
    BucketBy.USER_ID: common_pb2.ROLLOUT_BUCKET_BY_USER_ID,
    BucketBy.ORG_ID: common_pb2.ROLLOUT_BUCKET_BY_ORG_ID,
}


# --- results out ---------------------------------------------------------------------------------


def definition_to_pb(definition: Definition) -> preferences_pb2.Definition:
    """A domain Definition with its output-only fields (version, times, author)."""
    return preferences_pb2.Definition(
        key=definition.key,
        category=definition.category,
        description=definition.description,
        type=_VALUE_TYPES_PB[definition.value_type],
        default_value=None if is_rollout(definition.default) else value_to_pb(definition.default),
        default_rollout=rollout_to_pb(definition.default) if is_rollout(definition.default) else None,
        allowed_values=[value_to_pb(v) for v in definition.allowed_values],
        min_value=definition.min_value,
        max_value=definition.max_value,
        max_length=definition.max_length,
        overridable_scopes=[SCOPE_KINDS_PB[s] for s in ScopeKind if s in definition.scopes],
        sensitive=definition.sensitive,
        version=definition.version,
        create_time=timestamp(definition.created_at),
        update_time=timestamp(definition.updated_at),
        updated_by=definition.updated_by,
    )


def nested_to_pb(resolved: Iterable[ResolvedValue]) -> struct_pb2.Struct:
    """Effective values as one object nested by the dots of their keys."""
    struct = struct_pb2.Struct()
    struct.update(nest({r.key: r.value for r in resolved}))
    return struct


def changes_to_pb(result: WriteResult) -> list[preferences_pb2.PreferenceChange]:
    """Every key change of a write, in order."""
    return [change_to_pb(c) for c in result.changes]


def set_response_to_pb(result: WriteResult) -> preferences_pb2.SetPreferencesResponse:
    """A SetPreferences answer: the changes and the effective values of the written keys."""
    return preferences_pb2.SetPreferencesResponse(
        changes=changes_to_pb(result), effective_values=effective_to_pb(result.effective), dry_run=result.dry_run
    )


def stored_to_pb(stored: StoredValue) -> preferences_pb2.StoredPreference:
    """One override stored at a scope (its value or rollout, and its policy)."""
    policy = policy_from_json(stored.value) if is_policy(stored.value) else None
    value = policy.value if policy is not None else stored.value
    return preferences_pb2.StoredPreference(
        key=stored.key,
        value=None if is_rollout(value) else value_to_pb(value),
        rollout=rollout_to_pb(value) if is_rollout(value) else None,
        policy=policy_to_pb(policy) if policy is not None else None,
        version=stored.version,
        update_time=timestamp(stored.updated_at),
        updated_by=stored.updated_by,
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
