"""Domain errors and their one mapping to gRPC status codes with google.rpc details."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.model import FieldViolation

ERROR_DOMAIN = "prefd.dev"


class PrefdError(Exception):
    """Base of every error a client may see; subclasses fix the code and reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    def details(self) -> list[any_pb2.Any]:
        """Extra google.rpc detail messages besides ErrorInfo."""
        return []


class ValidationFailed(PrefdError):
    """The request is malformed; carries one violation per offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str = "") -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations[:5])
        super().__init__(message or f"invalid request: {summary}")

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed]


def invalid(field: str, description: str) -> ValidationFailed:
    """A ValidationFailed with a single field violation."""
    return ValidationFailed([FieldViolation(field, description)])


class RequestTooLarge(ValidationFailed):
    """A request over its method's size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__([FieldViolation("request", f"must be at most {limit} bytes (got {size})")])


class Unauthenticated(PrefdError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(PrefdError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DefinitionNotFound(PrefdError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "DEFINITION_NOT_FOUND"

    def __init__(self, key: str) -> None:
        super().__init__(f"definition {key!r} does not exist", key=key)


class DefinitionExists(PrefdError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "DEFINITION_EXISTS"

    def __init__(self, key: str) -> None:
        super().__init__(f"definition {key!r} already exists", key=key)


class DefinitionInUse(PrefdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "DEFINITION_IN_USE"


class VersionConflict(PrefdError):
    """A compare-and-set found another version than the caller expected."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "VERSION_CONFLICT"

    def __init__(self, subject: str, expected: int, actual: int) -> None:
        super().__init__(
            f"{subject}: expected version {expected}, found {actual}",
            subject=subject,
            expected_version=str(expected),
            actual_version=str(actual),
        )
        self.subject = subject

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="VERSION", subject=self.subject, description=self.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]


class AIConfigNotFound(PrefdError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "AI_CONFIG_NOT_FOUND"

    def __init__(self, config_id: str) -> None:
        super().__init__(f"AI config {config_id!r} does not exist", id=config_id)


class AIConfigExists(PrefdError):
    """The name is taken at that scope; names the request field like a validation error."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "AI_CONFIG_EXISTS"

    def __init__(self, name: str, scope: str, field: str) -> None:
        super().__init__(f"an AI config named {name!r} already exists at {scope}", name=name, scope=scope)
        self.field = field

    def details(self) -> list[any_pb2.Any]:
        return ValidationFailed([FieldViolation(self.field, self.message)]).details()


class RequestIdReused(ValidationFailed):
    """A RecordUsage request_id already recorded with other figures."""

    reason = "REQUEST_ID_REUSED"


class MasterKeyMissing(PrefdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MASTER_KEY_MISSING"


class StaleRollback(PrefdError):
    """The scopes changed since the rollback was previewed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "ROLLBACK_PREVIEW_STALE"


class UserErased(PrefdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "USER_ERASED"


class ChangeNotFound(PrefdError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "CHANGE_NOT_FOUND"

    def __init__(self, change_id: int, field: str) -> None:
        super().__init__(f"change {change_id} does not exist", id=str(change_id), field=field)


class SecretUnreadable(PrefdError):
    """A stored key was sealed under a master key this server does not hold, or was tampered with."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "SECRET_UNREADABLE"


class MaintenanceInProgress(PrefdError):
    """An operation on the same target has not finished."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MAINTENANCE_IN_PROGRESS"

    def __init__(self, target: str, operation_id: int | None) -> None:
        super().__init__(
            f"maintenance operation {operation_id} on {target} has not finished; wait for it",
            target=target,
            operation_id=str(operation_id),
        )


class MaintenanceNotFound(PrefdError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MAINTENANCE_OPERATION_NOT_FOUND"

    def __init__(self, operation_id: int) -> None:
        super().__init__(f"maintenance operation {operation_id} does not exist", id=str(operation_id))


class DatabaseUnavailable(PrefdError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


class ConcurrentModification(PrefdError):
    code = grpc.StatusCode.ABORTED
    reason = "CONCURRENT_MODIFICATION"


class WatchOverflow(PrefdError):
    """A watcher fell so far behind that its queue filled; it resumes from its cursor."""

    code = grpc.StatusCode.ABORTED
    reason = "WATCH_TOO_SLOW"


class ServerStopping(PrefdError):
    """The server is shutting down; the client resumes from its cursor (on any replica)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SERVER_STOPPING"


class DatabaseError(PrefdError):
    code = grpc.StatusCode.INTERNAL
    reason = "DATABASE_ERROR"


class _Status(grpc.Status):
    """A grpc.Status with chosen trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def to_status(error: PrefdError, trailing: tuple[tuple[str, str], ...] = ()) -> grpc.Status:
    """The grpc.Status (code, message, google.rpc.Status details, plus `trailing` metadata) for a
    domain error."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=[*error.details(), info],
    )
    converted: grpc.Status = rpc_status.to_status(status)
    if not trailing:
        return converted
    return _Status(converted.code, converted.details, (*converted.trailing_metadata, *trailing))
