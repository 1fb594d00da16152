"""prefd.v1.AuditService."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import grpc

from prefd.v1 import audit_pb2, audit_pb2_grpc
from prefd_server.audit.convert import KIND_NAMES, change_to_pb, key_diff_to_pb, restored_to_pb
from prefd_server.audit.model import ChangeFilter, Point
from prefd_server.audit.rules import export_document
from prefd_server.audit.store import HistoryStore, preferences_at
from prefd_server.audit.user_data_store import UserDataStore
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import PermissionDenied, UserErased, ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem, key_problem
from prefd_server.kernel.model import FieldViolation, JsonValue, Scope, ScopeKind, Subject
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.parts import Kernel
from prefd_server.kernel.restore import RestoreRequest, ScopeRestorer
from prefd_server.rpc import convert
from prefd_server.rpc.principal import current_call, current_principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_ROLLBACK_SCOPES = 100


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

    SERVICE_NAME: str = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
    add_to_server = staticmethod(audit_pb2_grpc.add_AuditServiceServicer_to_server)

    def __init__(
        self, kernel: Kernel, history: HistoryStore, user_data: UserDataStore, restorer: ScopeRestorer
    ) -> None:
        self._history = history
        self._user_data = user_data
        self._restorer = restorer
        self._tokens = kernel.tokens

    # --- history -------------------------------------------------------------------------

    async def ListChanges(
        self, request: audit_pb2.ListChangesRequest, context: Context
    ) -> audit_pb2.ListChangesResponse:
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
        found, horizon = await self._history.page(where, horizon, after, newest_first, page.limit)
        rows, next_token = page.cut(found, lambda r: f"{horizon}:{r.xid}:{r.id}")
        return audit_pb2.ListChangesResponse(
            changes=[change_to_pb(r, self._tokens) for r in rows], next_page_token=next_token
        )

    async def GetChange(self, request: audit_pb2.GetChangeRequest, context: Context) -> audit_pb2.GetChangeResponse:
        if request.id <= 0:
            raise invalid("id", "must be positive")
        return audit_pb2.GetChangeResponse(change=change_to_pb(await self._history.change(request.id), self._tokens))

    async def DiffScope(self, request: audit_pb2.DiffScopeRequest, context: Context) -> audit_pb2.DiffScopeResponse:
        scope = convert.scope_from_pb(request.scope)
        start = _point(request.__getattribute__("from"), "from")
        end = _point(request.to, "to") if request.HasField("to") else None
        await self._history.check_point(start, "from")
        if end is not None:
            await self._history.check_point(end, "to")
            if start.is_after(end):
                raise invalid("from", "must not be after `to`")
        diffs = [
            key_diff_to_pb(key, before, after) for key, before, after in await self._history.diff(scope, start, end)
        ]
        return audit_pb2.DiffScopeResponse(diffs=diffs)

    # --- rollback ------------------------------------------------------------------------

    async def PreviewRollback(
        self, request: audit_pb2.PreviewRollbackRequest, context: Context
    ) -> audit_pb2.PreviewRollbackResponse:
        restored, token = await self._restorer.preview(await self._restore_request(request.target, ""))
        return audit_pb2.PreviewRollbackResponse(scopes=[restored_to_pb(r) for r in restored], preview_token=token)

    async def Rollback(self, request: audit_pb2.RollbackRequest, context: Context) -> audit_pb2.RollbackResponse:
        reason = convert.check_reason(request.reason, required=True)
        restored = await self._restorer.apply(
            await self._restore_request(request.target, reason), request.preview_token
        )
        return audit_pb2.RollbackResponse(scopes=[restored_to_pb(r) for r in restored])

    async def _restore_request(self, target: audit_pb2.RollbackTarget, reason: str) -> RestoreRequest:
        """The validated target: its scopes (none erased) back to their preference state at a point."""
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
        await self._history.check_point(point, "target.to")
        for i, scope in enumerate(scopes):
            if scope.kind is ScopeKind.USER and await self._user_data.erased(scope.id) is not None:
                raise UserErased(f"{scope} was erased; its history is gone", field=f"target.scopes[{i}]")

        async def preferences_then(conn: asyncpg.Connection, scope: Scope) -> dict[str, JsonValue | None]:
            return await preferences_at(conn, scope, point)

        return RestoreRequest(
            scopes=scopes,
            target=preferences_then,
            keys=keys,
            org_id=target.org_id,
            rollback_of=point.describe(),
            call=current_call(),
            reason=reason,
        )

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
        subject = Subject(user_id, org_id)
        parts, history = await self._user_data.export(subject)
        document = export_document(subject, datetime.now(UTC), parts, history)
        return audit_pb2.ExportUserDataResponse(json=json.dumps(document, sort_keys=True, default=str))

    async def EraseUserData(
        self, request: audit_pb2.EraseUserDataRequest, context: Context
    ) -> audit_pb2.EraseUserDataResponse:
        user_id = _user_id(request.user_id)
        reason = convert.check_reason(request.reason, required=True)
        alias, counts, erased_now = await self._user_data.erase(user_id, current_call(), reason)
        return audit_pb2.EraseUserDataResponse(
            pseudonym=alias,
            overrides_deleted=counts.overrides,
            ai_configs_deleted=counts.ai_configs,
            changes_pseudonymised=counts.changes,
            erased_now=erased_now,
        )
