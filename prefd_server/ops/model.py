"""The ops domain's types: health reports, the database report and its alerts, maintenance records."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prefd_server.kernel.db import PoolStats

# --- system health -----------------------------------------------------------------------


class Status(enum.IntEnum):
    """A component's or the server's state (values match prefd.v1.HealthStatus)."""

    HEALTHY = 1
    DEGRADED = 2
    UNHEALTHY = 3


@dataclass(frozen=True, slots=True)
class ComponentReport:
    """One component's check."""

    name: str
    status: Status
    critical: bool
    latency_s: float
    error: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SystemReport:
    """Every component and the rolled-up state."""

    status: Status
    components: list[ComponentReport]
    uptime_s: float


# --- the database report -----------------------------------------------------------------


class Severity(enum.IntEnum):
    """How urgent an alert is (values match prefd.v1.AlertSeverity)."""

    WARNING = 1
    CRITICAL = 2


@dataclass(frozen=True, slots=True)
class DatabaseSummary:
    """pg_stat_database for the current database, with its size and the server's version."""

    name: str
    size_bytes: int
    blocks_hit: int
    blocks_read: int
    commits: int
    rollbacks: int
    deadlocks: int
    conflicts: int
    server_version: str
    stats_reset: datetime | None

    @property
    def blocks_requested(self) -> int:
        """Blocks asked for: found in shared buffers plus read from disk or the OS cache."""
        return self.blocks_hit + self.blocks_read

    @property
    def cache_hit_ratio(self) -> float:
        """Hits / (hits + reads); 1.0 when nothing has been asked for yet."""
        return self.blocks_hit / self.blocks_requested if self.blocks_requested else 1.0


@dataclass(frozen=True, slots=True)
class TableHealth:
    """pg_stat_user_tables and the sizes of one table."""

    name: str
    live_rows: int
    dead_rows: int
    table_size_bytes: int
    index_size_bytes: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    sequential_scans: int
    index_scans: int

    @property
    def bloat_percent(self) -> float:
        """Dead rows as a percentage of live plus dead rows; 0 for an empty table."""
        rows = self.live_rows + self.dead_rows
        return self.dead_rows / rows * 100 if rows else 0.0


@dataclass(frozen=True, slots=True)
class IndexHealth:
    """pg_stat_user_indexes and the size of one index."""

    name: str
    table: str
    size_bytes: int
    scans: int
    unique: bool

    @property
    def unused(self) -> bool:
        """Never scanned and not enforcing uniqueness (a primary key or unique index is never unused)."""
        return self.scans == 0 and not self.unique


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """Client connections to the server by state, against max_connections, and this process's pool."""

    by_state: Mapping[str, int]
    max_connections: int
    pool: PoolStats

    @property
    def total(self) -> int:
        """All client connections."""
        return sum(self.by_state.values())

    @property
    def used_fraction(self) -> float:
        """total / max_connections."""
        return self.total / self.max_connections if self.max_connections else 0.0


@dataclass(frozen=True, slots=True)
class OpenTransaction:
    """A backend whose open transaction holds an xid or a snapshot (xmin), and so the change feed's horizon."""

    pid: int
    database: str
    state: str
    age_s: float


@dataclass(frozen=True, slots=True)
class SlowQuery:
    """One normalised statement from pg_stat_statements; times in seconds."""

    query: str
    calls: int
    mean_s: float
    max_s: float
    total_s: float
    rows: int


@dataclass(frozen=True, slots=True)
class SlowQueryReport:
    """The statements at or over the threshold, or why they cannot be told."""

    available: bool
    unavailable_reason: str
    threshold_s: float
    queries: tuple[SlowQuery, ...] = ()


@dataclass(frozen=True, slots=True)
class DatabaseAlert:
    """One threshold crossed; value and threshold share a unit (percent, ratio or seconds)."""

    code: str
    severity: Severity
    target: str
    message: str
    value: float
    threshold: float


@dataclass(frozen=True, slots=True)
class DatabaseReport:
    """Everything GetDatabaseHealth tells, read at `collected_at` (the reading transaction's start)."""

    database: DatabaseSummary
    tables: tuple[TableHealth, ...]
    indexes: tuple[IndexHealth, ...]
    connections: ConnectionReport
    open_transactions: tuple[OpenTransaction, ...]
    slow_queries: SlowQueryReport
    alerts: tuple[DatabaseAlert, ...]
    collected_at: datetime


# --- maintenance -------------------------------------------------------------------------


class Operation(enum.Enum):
    """A maintenance operation on one of prefd's tables or indexes (stored and logged by its name)."""

    VACUUM = enum.auto()
    VACUUM_ANALYZE = enum.auto()
    ANALYZE = enum.auto()
    REINDEX = enum.auto()


class TargetKind(enum.StrEnum):
    """What a maintenance target is."""

    TABLE = "table"
    INDEX = "index"


@dataclass(frozen=True, slots=True)
class MaintenanceRecord:
    """One row of the maintenance log."""

    id: int
    operation: Operation
    target: str
    full: bool
    status: str
    initiator: str
    reason: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None
    error: str
