"""Domain errors: each class fixes a status code and a stable reason (rpc/status.py maps them to gRPC)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from prefd_server.kernel.model import FieldViolation


class Code(enum.Enum):
    """The canonical status codes prefd answers with (google.rpc.Code names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One failed precondition: its type (e.g. VERSION), what it is about, and what failed."""

    type: str
    subject: str
    description: str


class PrefdError(Exception):
    """Base of every error a client may see; subclasses fix the code and reason."""

    code: Code = Code.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    @property
    def violations(self) -> Sequence[FieldViolation]:
        """Offending request fields (a BadRequest detail at the edge)."""
        return ()

    @property
    def preconditions(self) -> Sequence[PreconditionViolation]:
        """Failed preconditions (a PreconditionFailure detail at the edge)."""
        return ()


class ValidationFailed(PrefdError):
    """The request is malformed; carries one violation per offending field."""

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str = "") -> None:
        self._violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self._violations[:5])
        super().__init__(message or f"invalid request: {summary}")

    @property
    def violations(self) -> Sequence[FieldViolation]:
        return self._violations


def invalid(field: str, description: str) -> ValidationFailed:
    """A ValidationFailed with a single field violation."""
    return ValidationFailed([FieldViolation(field, description)])


class RequestTooLarge(ValidationFailed):
    """A request over its method's size limit."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "REQUEST_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__([FieldViolation("request", f"must be at most {limit} bytes (got {size})")])


class Unauthenticated(PrefdError):
    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(PrefdError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DefinitionNotFound(PrefdError):
    code = Code.NOT_FOUND
    reason = "DEFINITION_NOT_FOUND"

    def __init__(self, key: str) -> None:
        super().__init__(f"definition {key!r} does not exist", key=key)


class DefinitionExists(PrefdError):
    code = Code.ALREADY_EXISTS
    reason = "DEFINITION_EXISTS"

    def __init__(self, key: str) -> None:
        super().__init__(f"definition {key!r} already exists", key=key)


class TemplateNotFound(PrefdError):
    code = Code.NOT_FOUND
    reason = "TEMPLATE_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"template {name!r} does not exist", template=name)


class TemplateExists(PrefdError):
    code = Code.ALREADY_EXISTS
    reason = "TEMPLATE_EXISTS"

    def __init__(self, name: str) -> None:
        super().__init__(f"template {name!r} already exists", template=name)


class DefinitionInUse(PrefdError):
    code = Code.FAILED_PRECONDITION
    reason = "DEFINITION_IN_USE"


class VersionConflict(PrefdError):
    """A compare-and-set found another version than the caller expected."""

    code = Code.FAILED_PRECONDITION
    reason = "VERSION_CONFLICT"

    def __init__(self, subject: str, expected: int, actual: int) -> None:
        super().__init__(
            f"{subject}: expected version {expected}, found {actual}",
            subject=subject,
            expected_version=str(expected),
            actual_version=str(actual),
        )
        self.subject = subject

    @property
    def preconditions(self) -> Sequence[PreconditionViolation]:
        return [PreconditionViolation("VERSION", self.subject, self.message)]


class PolicyViolation(PrefdError):
    """A write below an enforced or narrowing override that breaks it."""

    code = Code.FAILED_PRECONDITION
    reason = "POLICY_VIOLATION"

    def __init__(self, key: str, scope: str, policy_scope: str, rule: str) -> None:
        super().__init__(
            f"{key} at {scope} is refused by the policy at {policy_scope} ({rule})",
            key=key,
            policy_scope=policy_scope,
            rule=rule,
        )
        self.subject = f"{policy_scope}:{key}"

    @property
    def preconditions(self) -> Sequence[PreconditionViolation]:
        return [PreconditionViolation("POLICY", self.subject, self.message)]


class AIConfigNotFound(PrefdError):
    code = Code.NOT_FOUND
    reason = "AI_CONFIG_NOT_FOUND"

    def __init__(self, config_id: str) -> None:
        super().__init__(f"AI config {config_id!r} does not exist", id=config_id)


class AIConfigExists(PrefdError):
    """The name is taken at that scope; names the request field like a validation error."""

    code = Code.ALREADY_EXISTS
    reason = "AI_CONFIG_EXISTS"

    def __init__(self, name: str, scope: str, field: str) -> None:
        super().__init__(f"an AI config named {name!r} already exists at {scope}", name=name, scope=scope)
        self.field = field

    @property
    def violations(self) -> Sequence[FieldViolation]:
        return [FieldViolation(self.field, self.message)]


class RequestIdReused(ValidationFailed):
    """A RecordUsage request_id already recorded with other figures."""

    reason = "REQUEST_ID_REUSED"


class MasterKeyMissing(PrefdError):
    code = Code.FAILED_PRECONDITION
    reason = "MASTER_KEY_MISSING"


class StaleRollback(PrefdError):
    """The scopes changed since the rollback was previewed."""

    code = Code.FAILED_PRECONDITION
    reason = "ROLLBACK_PREVIEW_STALE"


class UserErased(PrefdError):
    code = Code.FAILED_PRECONDITION
    reason = "USER_ERASED"


class ChangeNotFound(PrefdError):
    code = Code.NOT_FOUND
    reason = "CHANGE_NOT_FOUND"

    def __init__(self, change_id: int, field: str) -> None:
        super().__init__(f"change {change_id} does not exist", id=str(change_id), field=field)


class SecretUnreadable(PrefdError):
    """A stored key was sealed under a master key this server does not hold, or was tampered with."""

    code = Code.FAILED_PRECONDITION
    reason = "SECRET_UNREADABLE"


class MaintenanceInProgress(PrefdError):
    """An operation on the same target has not finished."""

    code = Code.FAILED_PRECONDITION
    reason = "MAINTENANCE_IN_PROGRESS"

    def __init__(self, target: str, operation_id: int | None) -> None:
        super().__init__(
            f"maintenance operation {operation_id} on {target} has not finished; wait for it",
            target=target,
            operation_id=str(operation_id),
        )


class MaintenanceNotFound(PrefdError):
    code = Code.NOT_FOUND
    reason = "MAINTENANCE_OPERATION_NOT_FOUND"

    def __init__(self, operation_id: int) -> None:
        super().__init__(f"maintenance operation {operation_id} does not exist", id=str(operation_id))


class DatabaseUnavailable(PrefdError):
    code = Code.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


class ConcurrentModification(PrefdError):
    code = Code.ABORTED
    reason = "CONCURRENT_MODIFICATION"


class WatchOverflow(PrefdError):
    """A watcher fell so far behind that its queue filled; it resumes from its cursor."""

    code = Code.ABORTED
    reason = "WATCH_TOO_SLOW"


class ServerStopping(PrefdError):
    """The server is shutting down; the client resumes from its cursor (on any replica)."""

    code = Code.UNAVAILABLE
    reason = "SERVER_STOPPING"


class DatabaseError(PrefdError):
    code = Code.INTERNAL
    reason = "DATABASE_ERROR"
