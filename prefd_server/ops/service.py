"""prefd.v1.HealthService: system and database health, and maintenance of prefd's tables."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc

from prefd.v1 import health_pb2, health_pb2_grpc
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.parts import Kernel
from prefd_server.ops.checks import HealthChecker
from prefd_server.ops.convert import OPERATIONS, database_health_to_pb, maintenance_to_pb, system_health_to_pb
from prefd_server.ops.database_store import DatabaseHealthStore
from prefd_server.ops.maintenance_store import MaintenanceStore
from prefd_server.ops.rules import maintenance_violations
from prefd_server.rpc import convert
from prefd_server.rpc.principal import current_call

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class HealthService(health_pb2_grpc.HealthServiceServicer):
    """System health with per-component detail; the database report and maintenance are admin-only by the
    permission table (rpc/permissions.py)."""

    SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["HealthService"].full_name
    add_to_server = staticmethod(health_pb2_grpc.add_HealthServiceServicer_to_server)

    def __init__(
        self,
        kernel: Kernel,
        checker: HealthChecker,
        database: DatabaseHealthStore,
        maintenance: MaintenanceStore,
        slow_query_threshold_s: float,
    ) -> None:
        self._tokens = kernel.tokens
        self._checker = checker
        self._database = database
        self._maintenance = maintenance
        self._slow_query_threshold_s = slow_query_threshold_s

    async def GetSystemHealth(
        self, request: health_pb2.GetSystemHealthRequest, context: Context
    ) -> health_pb2.GetSystemHealthResponse:
        return system_health_to_pb(await self._checker.report())

    async def GetDatabaseHealth(
        self, request: health_pb2.GetDatabaseHealthRequest, context: Context
    ) -> health_pb2.GetDatabaseHealthResponse:
        threshold_s = self._slow_query_threshold_s
        if request.HasField("slow_query_threshold"):
            threshold_s = request.slow_query_threshold.ToNanoseconds() / 1e9
            if threshold_s < 0:
                raise invalid("slow_query_threshold", "must not be negative")
        return database_health_to_pb(await self._database.report(threshold_s))

    # --- maintenance ---------------------------------------------------------------------

    async def RunMaintenance(
        self, request: health_pb2.RunMaintenanceRequest, context: Context
    ) -> health_pb2.RunMaintenanceResponse:
        operation = OPERATIONS.get(request.operation)
        violations = maintenance_violations(operation, request.target, request.full, request.confirm_full)
        if violations:
            raise ValidationFailed(violations)
        assert operation is not None
        reason = convert.check_reason(request.reason)
        record, task = await self._maintenance.start(operation, request.target, request.full, current_call(), reason)
        if request.wait:
            # Shielded: a caller that gives up (deadline, cancel) does not interrupt the operation.
            record = await asyncio.shield(task)
        return health_pb2.RunMaintenanceResponse(operation=maintenance_to_pb(record))

    async def GetMaintenanceOperation(
        self, request: health_pb2.GetMaintenanceOperationRequest, context: Context
    ) -> health_pb2.GetMaintenanceOperationResponse:
        if request.id <= 0:
            raise invalid("id", "must be positive")
        record = await self._maintenance.get(request.id)
        return health_pb2.GetMaintenanceOperationResponse(operation=maintenance_to_pb(record))

    async def ListMaintenanceOperations(
        self, request: health_pb2.ListMaintenanceOperationsRequest, context: Context
    ) -> health_pb2.ListMaintenanceOperationsResponse:
        query = {"rpc": "ListMaintenanceOperations", "target": request.target}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        after = parse_int64(page.after) if page.after is not None else None
        records, next_token = page.cut(
            await self._maintenance.page(request.target, after, page.limit), lambda r: str(r.id)
        )
        return health_pb2.ListMaintenanceOperationsResponse(
            operations=[maintenance_to_pb(r) for r in records], next_page_token=next_token
        )
