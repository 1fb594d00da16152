"""Pure ops rules: the thresholds a database report is judged by, and what a maintenance request must hold."""

from __future__ import annotations

from collections.abc import Sequence

from prefd_server.kernel.model import FieldViolation
from prefd_server.ops.model import (
    ConnectionReport,
    DatabaseAlert,
    DatabaseSummary,
    IndexHealth,
    OpenTransaction,
    Operation,
    Severity,
    TableHealth,
)

# A table's bloat is judged only once it has this many rows (live plus dead): a ten-row table
# with three dead rows is 30% "bloated" and means nothing, and would flap on every update.
BLOAT_MIN_ROWS = 50
BLOAT_WARNING_PERCENT = 20.0
BLOAT_CRITICAL_PERCENT = 50.0
# The cache hit ratio is judged only once this many blocks were asked for: right after a start
# or a statistics reset a handful of cold reads would make it look bad.
CACHE_MIN_BLOCKS = 1000
CACHE_HIT_RATIO_MIN = 0.99
CONNECTIONS_WARNING_FRACTION = 0.8
CONNECTIONS_CRITICAL_FRACTION = 0.95


def database_alerts(
    database: DatabaseSummary,
    tables: Sequence[TableHealth],
    indexes: Sequence[IndexHealth],
    connections: ConnectionReport,
    open_transactions: Sequence[OpenTransaction],
    long_transaction_alert_s: float,
) -> tuple[DatabaseAlert, ...]:
    """The thresholds the figures cross.

    - CONNECTIONS_HIGH: client connections over 80% of max_connections (a ratio); CRITICAL over 95%.
    - CACHE_HIT_RATIO_LOW: the cache hit ratio under 0.99, judged only once CACHE_MIN_BLOCKS blocks
      were asked for; WARNING.
    - TABLE_BLOAT: dead rows over 20% of a table's rows (a percent), judged only for tables of at
      least BLOAT_MIN_ROWS live plus dead rows; CRITICAL over 50%.
    - LONG_TRANSACTION: a transaction holding an xid or xmin open longer than
      `long_transaction_alert_s` (seconds), target "pid <pid>"; WARNING.
    - INDEX_UNUSED: an index never scanned that enforces no uniqueness (value: its scans, 0); WARNING.

    The threshold reported is the one crossed: the CRITICAL one for a CRITICAL alert.
    """
    alerts: list[DatabaseAlert] = []
    fraction = connections.used_fraction
    if fraction > CONNECTIONS_WARNING_FRACTION:
        critical = fraction > CONNECTIONS_CRITICAL_FRACTION
        alerts.append(
            DatabaseAlert(
                "CONNECTIONS_HIGH",
                Severity.CRITICAL if critical else Severity.WARNING,
                database.name,
                f"{connections.total} of {connections.max_connections} connections are in use ({fraction:.0%}); "
                "new clients will soon be refused",
                fraction,
                CONNECTIONS_CRITICAL_FRACTION if critical else CONNECTIONS_WARNING_FRACTION,
            )
        )
    ratio = database.cache_hit_ratio
    if database.blocks_requested >= CACHE_MIN_BLOCKS and ratio < CACHE_HIT_RATIO_MIN:
        alerts.append(
            DatabaseAlert(
                "CACHE_HIT_RATIO_LOW",
                Severity.WARNING,
                database.name,
                f"only {ratio:.2%} of block requests were served from shared buffers; "
                "the working set may not fit in shared_buffers",
                ratio,
                CACHE_HIT_RATIO_MIN,
            )
        )
    for table in tables:
        bloat = table.bloat_percent
        if table.live_rows + table.dead_rows < BLOAT_MIN_ROWS or bloat <= BLOAT_WARNING_PERCENT:
            continue
        critical = bloat > BLOAT_CRITICAL_PERCENT
        alerts.append(
            DatabaseAlert(
                "TABLE_BLOAT",
                Severity.CRITICAL if critical else Severity.WARNING,
                table.name,
                f"{table.name}: {table.dead_rows} of {table.live_rows + table.dead_rows} rows are dead "
                f"({bloat:.1f}%); check that autovacuum keeps up, or VACUUM it",
                bloat,
                BLOAT_CRITICAL_PERCENT if critical else BLOAT_WARNING_PERCENT,
            )
        )
    for transaction in open_transactions:
        if transaction.age_s <= long_transaction_alert_s:
            continue
        alerts.append(
            DatabaseAlert(
                "LONG_TRANSACTION",
                Severity.WARNING,
                f"pid {transaction.pid}",
                f"backend {transaction.pid} ({transaction.database or 'no database'}, {transaction.state}) has held "
                f"a transaction open for {transaction.age_s:.1f} s, holding back the change feed and vacuum",
                transaction.age_s,
                long_transaction_alert_s,
            )
        )
    for index in indexes:
        if index.unused:
            alerts.append(
                DatabaseAlert(
                    "INDEX_UNUSED",
                    Severity.WARNING,
                    index.name,
                    f"{index.name} on {index.table} ({index.size_bytes} bytes) has not been scanned since the "
                    "statistics were reset; every write still maintains it",
                    float(index.scans),
                    0.0,
                )
            )
    return tuple(alerts)


def maintenance_violations(
    operation: Operation | None, target: str, full: bool, confirm_full: bool
) -> list[FieldViolation]:
    """What is wrong with a RunMaintenance request before its target is looked up (None: an unknown
    operation). Whether the target is one of prefd's tables or indexes is the store's to tell."""
    violations = []
    if operation is None:
        violations.append(FieldViolation("operation", "must be VACUUM, VACUUM_ANALYZE, ANALYZE or REINDEX"))
    if not target:
        violations.append(FieldViolation("target", "is required: one of prefd's tables or indexes"))
    if full and operation not in (Operation.VACUUM, Operation.VACUUM_ANALYZE):
        violations.append(FieldViolation("full", "only VACUUM and VACUUM_ANALYZE can be FULL"))
    elif full and not confirm_full:
        violations.append(
            FieldViolation(
                "confirm_full",
                "a VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock (its reads and writes "
                "wait until it ends); set confirm_full to run it",
            )
        )
    return violations
