"""prefd.v1.HealthService."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from google.protobuf import duration_pb2

from prefd.v1 import health_pb2, health_pb2_grpc
from server import __version__
from server.health import HealthChecker

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class HealthService(health_pb2_grpc.HealthServiceServicer):
    """System health with per-component detail."""

    def __init__(self, checker: HealthChecker) -> None:
        self._checker = checker

    async def GetSystemHealth(
        self, request: health_pb2.GetSystemHealthRequest, context: Context
    ) -> health_pb2.GetSystemHealthResponse:
        report = await self._checker.report()
        return health_pb2.GetSystemHealthResponse(
            status=int(report.status),  # type: ignore[arg-type]
            components=[
                health_pb2.ComponentHealth(
                    name=c.name,
                    status=int(c.status),  # type: ignore[arg-type]
                    critical=c.critical,
                    latency=_duration(c.latency_s),
                    error=c.error,
                    details=c.details,
                )
                for c in report.components
            ],
            version=__version__,
            uptime=_duration(report.uptime_s),
        )
