"""Typed errors carrying the gRPC status code, the ErrorInfo reason and field violations."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class PrefdError(Exception):
    """A failed prefd call: `code`, the stable `reason` (ErrorInfo) and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata: dict[str, str] | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}


class ValidationError(PrefdError):
    """INVALID_ARGUMENT: `violations` maps each offending field to what is wrong with it."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, violations: dict[str, str]):
        super().__init__(code, message, reason)
        self.violations = violations


def from_rpc_error(error: grpc.aio.AioRpcError) -> PrefdError:
    """The typed error for a failed call, decoding google.rpc.Status details when present."""
    reason, metadata, violations = "", {}, {}
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
    code, message = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationError(code, message, reason, violations)
    return PrefdError(code, message, reason, metadata)
