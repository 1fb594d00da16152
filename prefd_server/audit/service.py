"""prefd.v1.AuditService."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import struct_pb2

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from prefd_server.audit.store import AuditRow, AuditStore, ChangeFilter, KeyState, Point, state_at
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import PermissionDenied, UserErased, ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem, key_problem
from prefd_server.kernel.model import ChangeKind, FieldViolation, Scope, ScopeKind, Subject
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.tokens import TokenKey
from prefd_server.preferences.cache import EffectiveCache
from prefd_server.preferences.model import KeyWrite, WriteResult
from prefd_server.preferences.store import current_versions
from prefd_server.preferences.writes import PreferenceWriter
from prefd_server.rpc import convert
from prefd_server.rpc.auth import current_call, current_principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_ROLLBACK_SCOPES = 100
KIND_NAMES = {
    common_pb2.CHANGE_KIND_PREFERENCE: ChangeKind.PREFERENCE,
    common_pb2.CHANGE_KIND_DEFINITION: ChangeKind.DEFINITION,
    common_pb2.CHANGE_KIND_AI_CONFIG: ChangeKind.AI_CONFIG,
    common_pb2.CHANGE_KIND_AI_MODEL: ChangeKind.AI_MODEL,
    common_pb2.CHANGE_KIND_BUDGET: ChangeKind.BUDGET,
    common_pb2.CHANGE_KIND_MAINTENANCE: ChangeKind.MAINTENANCE,
    common_pb2.CHANGE_KIND_ERASURE: ChangeKind.ERASURE,
}
KIND_PB = {name: kind for kind, name in KIND_NAMES.items()}
CONSENT_MARKERS = ("consent",)


def _json_value(value: Any) -> struct_pb2.Value:
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
        old_value=_json_value(row.old_value),
        new_value=_json_value(row.new_value),
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


def _user_id(user_id: str, field: str = "user_id") -> str:
    problem = id_problem(user_id)
    if problem:
        raise invalid(field, problem)
    return user_id


def _point(message: audit_pb2.HistoryPoint, field: str) -> Point:
    which = message.WhichOneof("point")
    if which == "change_id":
        return Point(change_id=message.change_id)
    if which == "time":
        return Point(time=message.time.ToDatetime(tzinfo=UTC))
    raise invalid(field, "set change_id or time")


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    """The change history, diffs, rollback, export and erasure."""

    def __init__(
        self,
        store: AuditStore,
        writer: PreferenceWriter,
        cache: EffectiveCache,
        tokens: TokenKey,
        on_erased: Any,
    ) -> None:
        self._store = store
        self._writer = writer
        self._cache = cache
        self._tokens = tokens
        self._on_erased = on_erased

    # --- history -------------------------------------------------------------------------

    async def ListChanges(
        self, request: audit_pb2.ListChangesRequest, context: Context
    ) -> audit_pb2.ListChangesResponse:
        current_principal().require_admin("ListChanges")
        scope = convert.scope_from_pb(request.scope) if request.HasField("scope") else None
        violations = []
        kinds = []
        for i, kind in enumerate(request.kinds):
            if kind not in KIND_NAMES:
                violations.append(FieldViolation(f"kinds[{i}]", "must be a known change kind"))
            else:
                kinds.append(KIND_NAMES[kind])
        start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None
        if start and end and end <= start:
            violations.append(FieldViolation("end_time", "must be after start_time"))
        if len(request.key_prefix) > 128:
            violations.append(FieldViolation("key_prefix", "must be at most 128 characters"))
        if violations:
            raise ValidationFailed(violations)
        where = ChangeFilter(scope, request.key_prefix, tuple(sorted(kinds)), request.actor, start, end)
        newest_first = request.order == audit_pb2.CHANGE_ORDER_NEWEST_FIRST
        query = {
            "rpc": "ListChanges",
            "scope": str(scope) if scope else None,
            "prefix": where.key_prefix,
            "kinds": list(where.kinds),
            "actor": where.actor,
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "newest_first": newest_first,
        }
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        horizon = after = None
        if page.after is not None:
            parts = page.after.split(":")
            if len(parts) != 3:
                raise invalid("page_token", "is malformed")
            horizon, after = parse_int64(parts[0]), FeedCursor(parse_int64(parts[1]), parse_int64(parts[2]))
        found, horizon = await self._store.page(where, horizon, after, newest_first, page.limit)
        rows, next_token = page.cut(found, lambda r: f"{horizon}:{r.xid}:{r.id}")
        return audit_pb2.ListChangesResponse(
            changes=[change_to_pb(r, self._tokens) for r in rows], next_page_token=next_token
        )

    async def GetChange(self, request: audit_pb2.GetChangeRequest, context: Context) -> audit_pb2.GetChangeResponse:
        current_principal().require_admin("GetChange")
        if request.id <= 0:
            raise invalid("id", "must be positive")
        return audit_pb2.GetChangeResponse(change=change_to_pb(await self._store.change(request.id), self._tokens))

    async def DiffScope(self, request: audit_pb2.DiffScopeRequest, context: Context) -> audit_pb2.DiffScopeResponse:
        current_principal().require_admin("DiffScope")
        scope = convert.scope_from_pb(request.scope)
        start = _point(request.__getattribute__("from"), "from")
        end = _point(request.to, "to") if request.HasField("to") else None
        await self._store.check_point(start, "from")
        if end is not None:
            await self._store.check_point(end, "to")
            if _after(start, end):
                raise invalid("from", "must not be after `to`")
        diffs = [
            audit_pb2.KeyDiff(
                key=key,
                kind=KIND_PB[(before or after).kind],  # type: ignore[union-attr]
                before=_json_value(before.value if before else None),
                after=_json_value(after.value if after else None),
                before_version=before.version if before else 0,
                after_version=after.version if after else 0,
            )
            for key, before, after in await self._store.diff(scope, start, end)
        ]
        return audit_pb2.DiffScopeResponse(diffs=diffs)

    # --- rollback ------------------------------------------------------------------------

    async def PreviewRollback(
        self, request: audit_pb2.PreviewRollbackRequest, context: Context
    ) -> audit_pb2.PreviewRollbackResponse:
        current_principal().require_admin("PreviewRollback")
        results, token = await self._rollback(request.target, "", "", dry_run=True)
        return audit_pb2.PreviewRollbackResponse(scopes=results, preview_token=token)

    async def Rollback(self, request: audit_pb2.RollbackRequest, context: Context) -> audit_pb2.RollbackResponse:
        current_principal().require_admin("Rollback")
        reason = convert.check_reason(request.reason, required=True)
        results, _ = await self._rollback(request.target, reason, request.preview_token, dry_run=False)
        return audit_pb2.RollbackResponse(scopes=results)

    async def _rollback(
        self, target: audit_pb2.RollbackTarget, reason: str, expected_token: str, dry_run: bool
    ) -> tuple[list[audit_pb2.ScopeRollback], str]:
        if not target.scopes:
            raise invalid("target.scopes", "name at least one scope")
        if len(target.scopes) > MAX_ROLLBACK_SCOPES:
            raise invalid("target.scopes", f"at most {MAX_ROLLBACK_SCOPES} scopes")
        scopes = [convert.scope_from_pb(s, f"target.scopes[{i}]") for i, s in enumerate(target.scopes)]
        if len(set(scopes)) != len(scopes):
            raise invalid("target.scopes", "name each scope once")
        keys = list(target.keys)
        for i, key in enumerate(keys):
            problem = key_problem(key)
            if problem:
                raise invalid(f"target.keys[{i}]", problem)
        if target.org_id:
            _user_id(target.org_id, "target.org_id")
        point = _point(target.to, "target.to")
        await self._store.check_point(point, "target.to")
        for i, scope in enumerate(scopes):
            if scope.kind is ScopeKind.USER and await self._store.erased(scope.id) is not None:
                raise UserErased(f"{scope} was erased; its history is gone", field=f"target.scopes[{i}]")

        async def plan(conn: asyncpg.Connection, ordered: Sequence[Scope]) -> dict[Scope, list[KeyWrite]]:
            planned = {}
            for scope in ordered:
                wanted = await state_at(conn, scope, point.change_id, point.time, (ChangeKind.PREFERENCE,))
                current = await current_versions(conn, scope)
                planned[scope] = _writes_back(wanted, current, keys)
            return planned

        results, token = await self._writer.rollback(
            scopes,
            plan,
            current_call(),
            reason,
            dry_run=dry_run,
            expected_token=expected_token,
            org_id=target.org_id,
            rollback_of=point.describe(),
        )
        return [_scope_result(scope, result) for scope, result in zip(scopes, results, strict=True)], token

    # --- privacy -------------------------------------------------------------------------

    async def ExportUserData(
        self, request: audit_pb2.ExportUserDataRequest, context: Context
    ) -> audit_pb2.ExportUserDataResponse:
        principal = current_principal()
        user_id = _user_id(request.user_id)
        if not principal.is_admin and principal.subject != user_id:
            raise PermissionDenied(f"{principal.subject} may not export {user_id}'s data", action="export")
        org_id = request.org_id or (principal.org if principal.subject == user_id else "")
        if org_id:
            _user_id(org_id, "org_id")
        stored = await self._store.export(user_id)
        values, _ = await self._cache.resolve_subject(Subject(user_id, org_id), (), ())
        effective = {v.key: v.value for v in values}
        document = {
            "user_id": user_id,
            "org_id": org_id,
            "exported_at": datetime.now(UTC).isoformat(),
            "overrides": stored["overrides"],
            "effective_preferences": effective,
            "ai_configs": stored["ai_configs"],
            "consent": {k: v for k, v in effective.items() if any(m in k.lower() for m in CONSENT_MARKERS)},
            "usage": stored["usage"],
            "changes": stored["changes"],
        }
        return audit_pb2.ExportUserDataResponse(json=json.dumps(document, sort_keys=True, default=str))

    async def EraseUserData(
        self, request: audit_pb2.EraseUserDataRequest, context: Context
    ) -> audit_pb2.EraseUserDataResponse:
        current_principal().require_admin("EraseUserData")
        user_id = _user_id(request.user_id)
        reason = convert.check_reason(request.reason, required=True)
        alias, counts, erased_now, xid = await self._store.erase(user_id, current_call(), reason)
        self._on_erased(user_id, xid)
        return audit_pb2.EraseUserDataResponse(
            pseudonym=alias,
            overrides_deleted=counts.overrides,
            ai_configs_deleted=counts.ai_configs,
            changes_pseudonymised=counts.changes,
            erased_now=erased_now,
        )


def _after(start: Point, end: Point) -> bool:
    if start.change_id is not None and end.change_id is not None:
        return start.change_id > end.change_id
    if start.time is not None and end.time is not None:
        return start.time > end.time
    return False


def _writes_back(wanted: dict[str, KeyState], current: dict[str, Any], keys: Sequence[str]) -> list[KeyWrite]:
    """The writes that make the current overrides equal the wanted ones (for `keys`, or all)."""
    live = {key for key, (value, _version) in current.items() if value is not None}
    candidates = sorted(keys) if keys else sorted(live | {k for k, s in wanted.items() if s.value is not None})
    writes = []
    for key in candidates:
        target = wanted[key].value if key in wanted else None
        now = current.get(key, (None, 0))[0]
        if target != now or type(target) is not type(now):
            writes.append(KeyWrite(key, target))
    return writes


def _scope_result(scope: Scope, result: WriteResult) -> audit_pb2.ScopeRollback:
    return audit_pb2.ScopeRollback(
        scope=convert.scope_to_pb(scope),
        changes=[convert.change_to_pb(c) for c in result.changes],
        effective_values=convert.effective_to_pb(result.effective),
    )
