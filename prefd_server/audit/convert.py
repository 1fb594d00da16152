"""Protobuf mapping of audit's results: change rows, key diffs, rollback outcomes and change kinds."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from prefd.v1 import audit_pb2, common_pb2
from prefd_server.audit.model import AuditRow, KeyState
from prefd_server.kernel.model import ChangeKind
from prefd_server.kernel.restore import ScopeRestored
from prefd_server.kernel.tokens import TokenKey
from prefd_server.rpc import convert

KIND_NAMES = {
    common_pb2.CHANGE_KIND_PREFERENCE: ChangeKind.PREFERENCE,
    common_pb2.CHANGE_KIND_DEFINITION: ChangeKind.DEFINITION,
    common_pb2.CHANGE_KIND_AI_CONFIG: ChangeKind.AI_CONFIG,
    common_pb2.CHANGE_KIND_AI_MODEL: ChangeKind.AI_MODEL,
    common_pb2.CHANGE_KIND_BUDGET: ChangeKind.BUDGET,
    common_pb2.CHANGE_KIND_MAINTENANCE: ChangeKind.MAINTENANCE,
    common_pb2.CHANGE_KIND_ERASURE: ChangeKind.ERASURE,
    common_pb2.CHANGE_KIND_CONSENT: ChangeKind.CONSENT,
}
KIND_PB = {name: kind for kind, name in KIND_NAMES.items()}


def json_value(value: Any) -> struct_pb2.Value:
    """A JSON document as google.protobuf.Value; scalars directly (the common case, and several times
    faster than json_format), objects and arrays through Struct/ListValue's own conversion."""
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, dict):
        struct = struct_pb2.Struct()
        struct.update(value)
        return struct_pb2.Value(struct_value=struct)
    items = struct_pb2.ListValue()
    items.extend(value)
    return struct_pb2.Value(list_value=items)


def change_to_pb(row: AuditRow, tokens: TokenKey) -> audit_pb2.AuditChange:
    return audit_pb2.AuditChange(
        id=row.id,
        kind=KIND_PB.get(row.kind, common_pb2.CHANGE_KIND_UNSPECIFIED),
        scope=convert.scope_to_pb(row.scope),
        key=row.key,
        old_value=json_value(row.old_value),
        new_value=json_value(row.new_value),
        version=row.version,
        actor=row.actor,
        peer=row.peer,
        user_agent=row.user_agent,
        reason=row.reason,
        request_id=row.request_id,
        create_time=convert.timestamp(row.created_at),
        rollback_of=row.rollback_of,
        cursor=convert.cursor_to_pb(row.position, tokens),
    )


def key_diff_to_pb(key: str, before: KeyState | None, after: KeyState | None) -> audit_pb2.KeyDiff:
    return audit_pb2.KeyDiff(
        key=key,
        kind=KIND_PB[(before or after).kind],  # type: ignore[union-attr]
        before=json_value(before.value if before else None),
        after=json_value(after.value if after else None),
        before_version=before.version if before else 0,
        after_version=after.version if after else 0,
    )


def restored_to_pb(restored: ScopeRestored) -> audit_pb2.ScopeRollback:
    return audit_pb2.ScopeRollback(
        scope=convert.scope_to_pb(restored.scope),
        changes=[convert.change_to_pb(c) for c in restored.changes],
        effective_values=convert.effective_to_pb(restored.effective),
    )
