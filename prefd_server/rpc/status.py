"""The one mapping from domain errors to gRPC status: code, message and google.rpc details."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from prefd_server.kernel.errors import Code, PrefdError

ERROR_DOMAIN = "prefd.dev"


def grpc_code(code: Code) -> grpc.StatusCode:
    """The grpc.StatusCode of a domain code."""
    return grpc.StatusCode[code.name]


class _Status(grpc.Status):
    """A grpc.Status with chosen trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def details_of(error: PrefdError) -> list[any_pb2.Any]:
    """google.rpc detail messages for `error`: BadRequest, PreconditionFailure, then ErrorInfo."""
    details = []
    if error.violations:
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if error.preconditions:
        details.append(
            _packed(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=p.type, subject=p.subject, description=p.description
                        )
                        for p in error.preconditions
                    ]
                )
            )
        )
    details.append(
        _packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    )
    return details


def to_status(error: PrefdError, trailing: tuple[tuple[str, str], ...] = ()) -> grpc.Status:
    """The grpc.Status (code, message, google.rpc.Status details, plus `trailing` metadata) for a
    domain error."""
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=details_of(error),
    )
    converted: grpc.Status = rpc_status.to_status(status)
    if not trailing:
        return converted
    return _Status(converted.code, converted.details, (*converted.trailing_metadata, *trailing))
