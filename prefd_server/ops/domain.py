"""Builds the operations domain on the kernel: component checks, the database report and maintenance."""

from __future__ import annotations

from prefd_server.kernel.parts import Domain, Kernel
from prefd_server.ops.checks import HealthChecker
from prefd_server.ops.database_store import DatabaseHealthStore
from prefd_server.ops.maintenance_store import MaintenanceStore
from prefd_server.ops.service import HealthService
from prefd_server.settings import Settings


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Maintenance runs on connections of its own and is stopped (within the grace period) at shutdown."""
    maintenance = MaintenanceStore(kernel.pool, kernel.dsn, kernel.commits.feed_appended)
    service = HealthService(
        kernel,
        HealthChecker(kernel.pool, kernel.redis, kernel.feed, settings.health_timeout_s),
        DatabaseHealthStore(kernel.pool, settings.long_transaction_alert_s),
        maintenance,
        settings.slow_query_threshold_ms / 1000,
    )
    return Domain("ops", [service], maintenance.stop)
