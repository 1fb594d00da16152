"""The ops domain's protobuf mapping: the system report, the database report and maintenance records."""

from __future__ import annotations

from prefd.v1 import health_pb2
from prefd_server import __version__
from prefd_server.kernel.db import PoolStats
from prefd_server.ops.model import (
    ConnectionReport,
    DatabaseAlert,
    DatabaseReport,
    DatabaseSummary,
    IndexHealth,
    MaintenanceRecord,
    Operation,
    Severity,
    SlowQuery,
    SlowQueryReport,
    SystemReport,
    TableHealth,
)
from prefd_server.rpc import convert

_SEVERITIES = {
    Severity.WARNING: health_pb2.ALERT_SEVERITY_WARNING,
    Severity.CRITICAL: health_pb2.ALERT_SEVERITY_CRITICAL,
}
OPERATIONS = {
    health_pb2.MAINTENANCE_OPERATION_VACUUM: Operation.VACUUM,
    health_pb2.MAINTENANCE_OPERATION_VACUUM_ANALYZE: Operation.VACUUM_ANALYZE,
    health_pb2.MAINTENANCE_OPERATION_ANALYZE: Operation.ANALYZE,
    health_pb2.MAINTENANCE_OPERATION_REINDEX: Operation.REINDEX,
}
_OPERATION_PB = {operation: number for number, operation in OPERATIONS.items()}
_STATUS_PB = {
    "queued": health_pb2.MAINTENANCE_STATUS_QUEUED,
    "running": health_pb2.MAINTENANCE_STATUS_RUNNING,
    "completed": health_pb2.MAINTENANCE_STATUS_COMPLETED,
    "failed": health_pb2.MAINTENANCE_STATUS_FAILED,
}


def system_health_to_pb(report: SystemReport) -> health_pb2.GetSystemHealthResponse:
    """Every component's check and the rolled-up state, with this server's version."""
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


def maintenance_to_pb(record: MaintenanceRecord) -> health_pb2.MaintenanceRecord:
    """One row of the maintenance log."""
    return health_pb2.MaintenanceRecord(
        id=record.id,
        operation=_OPERATION_PB[record.operation],
        target=record.target,
        full=record.full,
        status=_STATUS_PB[record.status],
        initiator=record.initiator,
        reason=record.reason,
        create_time=convert.timestamp(record.created_at),
        start_time=convert.timestamp(record.started_at),
        end_time=convert.timestamp(record.finished_at),
        duration=convert.duration(record.duration_ms / 1000) if record.duration_ms is not None else None,
        error=record.error,
    )


def database_health_to_pb(report: DatabaseReport) -> health_pb2.GetDatabaseHealthResponse:
    """The whole report."""
    return health_pb2.GetDatabaseHealthResponse(
        database=_database_to_pb(report.database),
        tables=[_table_to_pb(table) for table in report.tables],
        indexes=[_index_to_pb(index) for index in report.indexes],
        connections=_connections_to_pb(report.connections),
        slow_queries=_slow_queries_to_pb(report.slow_queries),
        alerts=[_alert_to_pb(alert) for alert in report.alerts],
        collect_time=convert.timestamp(report.collected_at),
    )


def _database_to_pb(database: DatabaseSummary) -> health_pb2.DatabaseSummary:
    return health_pb2.DatabaseSummary(
        name=database.name,
        size_bytes=database.size_bytes,
        cache_hit_ratio=database.cache_hit_ratio,
        commits=database.commits,
        rollbacks=database.rollbacks,
        deadlocks=database.deadlocks,
        conflicts=database.conflicts,
        server_version=database.server_version,
        stats_reset_time=convert.timestamp(database.stats_reset),
    )


def _table_to_pb(table: TableHealth) -> health_pb2.TableHealth:
    return health_pb2.TableHealth(
        name=table.name,
        live_rows=table.live_rows,
        dead_rows=table.dead_rows,
        bloat_percent=table.bloat_percent,
        table_size_bytes=table.table_size_bytes,
        index_size_bytes=table.index_size_bytes,
        last_vacuum_time=convert.timestamp(table.last_vacuum),
        last_autovacuum_time=convert.timestamp(table.last_autovacuum),
        last_analyze_time=convert.timestamp(table.last_analyze),
        last_autoanalyze_time=convert.timestamp(table.last_autoanalyze),
        sequential_scans=table.sequential_scans,
        index_scans=table.index_scans,
    )


def _index_to_pb(index: IndexHealth) -> health_pb2.IndexHealth:
    return health_pb2.IndexHealth(
        name=index.name,
        table=index.table,
        size_bytes=index.size_bytes,
        scans=index.scans,
        unused=index.unused,
        unique=index.unique,
    )


def _pool_to_pb(pool: PoolStats) -> health_pb2.PoolStats:
    return health_pb2.PoolStats(
        size=pool.size,
        in_use=pool.in_use,
        idle=pool.idle,
        waiting=pool.waiting,
        min_size=pool.min_size,
        max_size=pool.max_size,
    )


def _connections_to_pb(connections: ConnectionReport) -> health_pb2.ConnectionReport:
    return health_pb2.ConnectionReport(
        by_state=dict(connections.by_state),
        total=connections.total,
        max_connections=connections.max_connections,
        used_fraction=connections.used_fraction,
        pool=_pool_to_pb(connections.pool),
    )


def _slow_query_to_pb(query: SlowQuery) -> health_pb2.SlowQuery:
    return health_pb2.SlowQuery(
        query=query.query,
        calls=query.calls,
        mean_time=convert.duration(query.mean_s),
        max_time=convert.duration(query.max_s),
        total_time=convert.duration(query.total_s),
        rows=query.rows,
    )


def _slow_queries_to_pb(report: SlowQueryReport) -> health_pb2.SlowQueryReport:
    return health_pb2.SlowQueryReport(
        available=report.available,
        unavailable_reason=report.unavailable_reason,
        threshold=convert.duration(report.threshold_s),
        queries=[_slow_query_to_pb(query) for query in report.queries],
    )


def _alert_to_pb(alert: DatabaseAlert) -> health_pb2.DatabaseAlert:
    return health_pb2.DatabaseAlert(
        code=alert.code,
        severity=_SEVERITIES[alert.severity],
        target=alert.target,
        message=alert.message,
        value=alert.value,
        threshold=alert.threshold,
    )
