"""prefd.v1.HealthService."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc

from prefd.v1 import health_pb2, health_pb2_grpc
from prefd_server import __version__
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.model import FieldViolation
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.tokens import TokenKey
from prefd_server.ops.checks import HealthChecker
from prefd_server.ops.database_report import database_health_to_pb
from prefd_server.ops.database_store import DatabaseHealthStore
from prefd_server.ops.maintenance_store import MaintenanceRecord, MaintenanceStore, Operation
from prefd_server.rpc import convert
from prefd_server.rpc.auth import current_call, current_principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


OPERATIONS = {
    health_pb2.MAINTENANCE_OPERATION_VACUUM: Operation.VACUUM,
    health_pb2.MAINTENANCE_OPERATION_VACUUM_ANALYZE: Operation.VACUUM_ANALYZE,
    health_pb2.MAINTENANCE_OPERATION_ANALYZE: Operation.ANALYZE,
    health_pb2.MAINTENANCE_OPERATION_REINDEX: Operation.REINDEX,
}
OPERATION_PB = {operation: number for number, operation in OPERATIONS.items()}
STATUS_PB = {
    "queued": health_pb2.MAINTENANCE_STATUS_QUEUED,
    "running": health_pb2.MAINTENANCE_STATUS_RUNNING,
    "completed": health_pb2.MAINTENANCE_STATUS_COMPLETED,
    "failed": health_pb2.MAINTENANCE_STATUS_FAILED,
}


def maintenance_to_pb(record: MaintenanceRecord) -> health_pb2.MaintenanceRecord:
    return health_pb2.MaintenanceRecord(
        id=record.id,
        operation=OPERATION_PB[record.operation],
        target=record.target,
        full=record.full,
        status=STATUS_PB[record.status],
        initiator=record.initiator,
        reason=record.reason,
        create_time=convert.timestamp(record.created_at),
        start_time=convert.timestamp(record.started_at),
        end_time=convert.timestamp(record.finished_at),
        duration=convert.duration(record.duration_ms / 1000) if record.duration_ms is not None else None,
        error=record.error,
    )


class HealthService(health_pb2_grpc.HealthServiceServicer):
    """System health with per-component detail."""

    def __init__(
        self,
        checker: HealthChecker,
        database: DatabaseHealthStore,
        maintenance: MaintenanceStore,
        slow_query_threshold_s: float,
        tokens: TokenKey,
    ) -> None:
        self._tokens = tokens
        self._checker = checker
        self._database = database
        self._maintenance = maintenance
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
                    latency=convert.duration(c.latency_s),
                    error=c.error,
                    details=c.details,
                )
                for c in report.components
            ],
            version=__version__,
            uptime=convert.duration(report.uptime_s),
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

    # --- maintenance ---------------------------------------------------------------------

    async def RunMaintenance(
        self, request: health_pb2.RunMaintenanceRequest, context: Context
    ) -> health_pb2.RunMaintenanceResponse:
        current_principal().require_admin("RunMaintenance")
        violations = []
        operation = OPERATIONS.get(request.operation)
        if operation is None:
            violations.append(FieldViolation("operation", "must be VACUUM, VACUUM_ANALYZE, ANALYZE or REINDEX"))
        if not request.target:
            violations.append(FieldViolation("target", "is required: one of prefd's tables or indexes"))
        if request.full and operation not in (Operation.VACUUM, Operation.VACUUM_ANALYZE):
            violations.append(FieldViolation("full", "only VACUUM and VACUUM_ANALYZE can be FULL"))
        elif request.full and not request.confirm_full:
            violations.append(
                FieldViolation(
                    "confirm_full",
                    "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock (its reads and writes "
                    "wait until it ends); set confirm_full to run it",
                )
            )
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
        current_principal().require_admin("GetMaintenanceOperation")
        if request.id <= 0:
            raise invalid("id", "must be positive")
        record = await self._maintenance.get(request.id)
        return health_pb2.GetMaintenanceOperationResponse(operation=maintenance_to_pb(record))

    async def ListMaintenanceOperations(
        self, request: health_pb2.ListMaintenanceOperationsRequest, context: Context
    ) -> health_pb2.ListMaintenanceOperationsResponse:
        current_principal().require_admin("ListMaintenanceOperations")
        query = {"rpc": "ListMaintenanceOperations", "target": request.target}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        after = parse_int64(page.after) if page.after is not None else None
        records, next_token = page.cut(
            await self._maintenance.page(request.target, after, page.limit), lambda r: str(r.id)
        )
        return health_pb2.ListMaintenanceOperationsResponse(
            operations=[maintenance_to_pb(r) for r in records], next_page_token=next_token
        )
