"""The caller of the RPC being handled: the Principal and its role rules, its request id and CallInfo."""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass
from typing import Any

from prefd_server.kernel.errors import PermissionDenied
from prefd_server.kernel.model import CallInfo, Scope, ScopeKind, Subject


class Role(enum.StrEnum):
    """What a token may do."""

    USER = "user"
    SERVICE = "service"
    ADMIN = "admin"


_READ_ANY = frozenset({Role.SERVICE, Role.ADMIN})

# Reads AI API keys in clear; honoured only on service tokens that carry it explicitly.
READ_SECRETS = "ai:secrets:read"


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller of one RPC."""

    subject: str
    org: str
    roles: frozenset[Role]
    permissions: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def reads_any(self) -> bool:
        """Service and admin tokens read any subject and scope."""
        return not self.roles.isdisjoint(_READ_ANY)

    @property
    def reads_secrets(self) -> bool:
        """Whether responses may carry API keys in clear (a service token granted ai:secrets:read)."""
        return Role.SERVICE in self.roles and READ_SECRETS in self.permissions

    def require_service(self, action: str) -> None:
        """PERMISSION_DENIED unless the caller is a service or an admin."""
        if self.roles.isdisjoint(_READ_ANY):
            raise PermissionDenied(f"{action} needs the service or admin role", action=action)

    def require_admin(self, action: str) -> None:
        """PERMISSION_DENIED unless the caller is an admin."""
        if not self.is_admin:
            raise PermissionDenied(f"{action} needs the admin role", action=action)

    def may_read(self, user_id: str, org_id: str) -> bool:
        """Whether the caller may read this subject: a user only itself (its own org); service and admin any."""
        if not self.roles.isdisjoint(_READ_ANY):
            return True
        return Role.USER in self.roles and user_id == self.subject and org_id in ("", self.org)

    def require_read(self, subject: Subject) -> None:
        """PERMISSION_DENIED unless may_read."""
        if self.may_read(subject.user_id, subject.org_id):
            return
        raise PermissionDenied(f"{self.subject} may not read subject {subject.user_id}", action="read")

    def require_read_scope(self, scope: Scope) -> None:
        """A user reads only its own USER scope; service and admin read any scope."""
        if not self.roles.isdisjoint(_READ_ANY):
            return
        if Role.USER in self.roles and scope == Scope(ScopeKind.USER, self.subject):
            return
        raise PermissionDenied(f"{self.subject} may not read {scope}", action="read")

    def require_write(self, scope: Scope) -> None:
        """A user writes only its own USER scope; admin writes any; service writes nothing."""
        if self.is_admin:
            return
        if Role.USER in self.roles and scope == Scope(ScopeKind.USER, self.subject):
            return
        raise PermissionDenied(f"{self.subject} may not write {scope}", action="write")


class _Call:
    """The RPC being handled: its verified caller, and (built only when a write needs it) its CallInfo."""

    __slots__ = ("_info", "context", "principal", "request_id")

    def __init__(self, principal: Principal, context: Any, request_id: str) -> None:
        self.principal = principal
        self.context = context
        self.request_id = request_id
        self._info: CallInfo | None = None

    def info(self) -> CallInfo:
        if self._info is None:
            metadata = {k: v for k, v in self.context.invocation_metadata() or () if isinstance(v, str)}
            self._info = CallInfo(
                actor=self.principal.subject,
                peer=self.context.peer() or "",
                user_agent=metadata.get("user-agent", "")[:256],
                request_id=self.request_id,
            )
        return self._info


_current_call: contextvars.ContextVar[_Call] = contextvars.ContextVar("prefd_call")
# (request id, full method name) of the RPC being handled, set before authentication so that every
# log line of a call, a refused one included, carries them.
_current_request: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("prefd_request")


def enter_request(request_id: str, method: str) -> None:
    """Mark this context as handling `method` under `request_id` (before its caller is known)."""
    _current_request.set((request_id, method))


def enter_call(principal: Principal, context: Any, request_id: str) -> None:
    """Make `principal` the verified caller of the RPC this context handles."""
    _current_call.set(_Call(principal, context, request_id))


def current_request() -> tuple[str, str] | None:
    """(request id, method) of the RPC being handled in this context, if any."""
    return _current_request.get(None)


def current_principal() -> Principal:
    """The verified caller of the RPC being handled."""
    return _current_call.get().principal


def current_call() -> CallInfo:
    """Actor, peer, user agent and request id of the RPC being handled."""
    return _current_call.get().info()
