"""prefd.v1.HealthService."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from google.protobuf import duration_pb2

from prefd.v1 import health_pb2, health_pb2_grpc
from server import __version__
from server.auth import current_principal
from server.errors import invalid
from server.health import HealthChecker
from server.services.database_health import database_health_to_pb
from server.store.db_health import DatabaseHealthStore

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class HealthService(health_pb2_grpc.HealthServiceServicer):
    """System health with per-component detail."""

    def __init__(self, checker: HealthChecker, database: DatabaseHealthStore, slow_query_threshold_s: float) -> None:
        self._checker = checker
        self._database = database
        self._slow_query_threshold_s = slow_query_threshold_s

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

    async def GetDatabaseHealth(
        self, request: health_pb2.GetDatabaseHealthRequest, context: Context
    ) -> health_pb2.GetDatabaseHealthResponse:
        current_principal().require_admin("GetDatabaseHealth")
        threshold_s = self._slow_query_threshold_s
        if request.HasField("slow_query_threshold"):
            threshold_s = request.slow_query_threshold.ToNanoseconds() / 1e9
            if threshold_s < 0:
                raise invalid("slow_query_threshold", "must not be negative")
        return database_health_to_pb(await self._database.report(threshold_s))
