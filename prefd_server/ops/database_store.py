"""SQL over PostgreSQL's statistics views for GetDatabaseHealth, and the alerts its figures raise.

One report is one read: a REPEATABLE READ, read-only transaction on one pooled connection, with
`stats_fetch_consistency = snapshot` so every statistics view answers from the same snapshot.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from prefd_server.kernel.db import PoolStats, pool_stats, translated_errors

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
MAX_SLOW_QUERIES = 20
# Open transactions read for LONG_TRANSACTION, oldest first; alerts beyond this many add nothing.
MAX_OPEN_TRANSACTIONS = 100

NOT_INSTALLED = (
    "the pg_stat_statements extension is not installed in this database "
    "(CREATE EXTENSION pg_stat_statements; it also needs shared_preload_libraries)"
)


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


_DATABASE = """
    SELECT current_database() AS name, pg_database_size(d.datid) AS size_bytes,
           d.blks_hit, d.blks_read, d.xact_commit, d.xact_rollback, d.deadlocks, d.conflicts,
           d.stats_reset, current_setting('server_version') AS server_version, now() AS collected_at
    FROM pg_stat_database d
    WHERE d.datname = current_database()"""

_TABLES = """
    SELECT relname AS name, n_live_tup, n_dead_tup,
           coalesce(pg_table_size(relid), 0) AS table_size_bytes,
           coalesce(pg_indexes_size(relid), 0) AS index_size_bytes,
           last_vacuum, last_autovacuum, last_analyze, last_autoanalyze,
           coalesce(seq_scan, 0) AS seq_scan, coalesce(idx_scan, 0) AS idx_scan
    FROM pg_stat_user_tables
    WHERE schemaname = current_schema()
    ORDER BY relname"""

_INDEXES = """
    SELECT s.indexrelname AS name, s.relname AS table_name,
           coalesce(pg_relation_size(s.indexrelid), 0) AS size_bytes,
           coalesce(s.idx_scan, 0) AS idx_scan, (i.indisunique OR i.indisprimary) AS is_unique
    FROM pg_stat_user_indexes s
    JOIN pg_index i ON i.indexrelid = s.indexrelid
    WHERE s.schemaname = current_schema()
    ORDER BY s.relname, s.indexrelname"""

_CONNECTIONS = """
    SELECT coalesce(state, 'unknown') AS state, count(*)::int AS connections
    FROM pg_stat_activity
    WHERE backend_type = 'client backend'
    GROUP BY 1"""

# Cluster-wide: xids are, so a transaction in any database holds the feed's horizon.
_OPEN_TRANSACTIONS = f"""
    SELECT pid, coalesce(datname, '') AS datname, coalesce(state, 'unknown') AS state,
           extract(epoch FROM now() - xact_start)::float8 AS age_s
    FROM pg_stat_activity
    WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
      AND xact_start IS NOT NULL
      AND pid <> pg_backend_pid()
    ORDER BY xact_start
    LIMIT {MAX_OPEN_TRANSACTIONS}"""

_STATEMENTS_SCHEMA = """
    SELECT quote_ident(n.nspname)
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_stat_statements'"""

# pg_stat_statements is cluster-wide; only this database's statements are prefd's. Times are in ms.
_SLOW_QUERIES = """
    SELECT coalesce(query, '') AS query, calls, mean_exec_time, max_exec_time, total_exec_time, rows
    FROM {schema}.pg_stat_statements
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND mean_exec_time >= $1
    ORDER BY mean_exec_time DESC
    LIMIT {limit}"""


class DatabaseHealthStore:
    """Reads the database report for prefd's own tables (those in the current schema)."""

    def __init__(self, pool: asyncpg.Pool, long_transaction_alert_s: float) -> None:
        self._pool = pool
        self._long_transaction_alert_s = long_transaction_alert_s

    async def report(self, slow_query_threshold_s: float) -> DatabaseReport:
        """The report, read in one transaction; UNAVAILABLE when PostgreSQL cannot be reached."""
        async with translated_errors(), self._pool.acquire() as conn:
            # Taken while this report holds its connection, so that connection counts as in use.
            pool = pool_stats(self._pool)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                if conn.get_server_version() >= (15, 0):
                    # Without it each statistics view would be read at its own moment.
                    await conn.execute("SET LOCAL stats_fetch_consistency = snapshot")
                row = await conn.fetchrow(_DATABASE)
                tables = tuple(_table(r) for r in await conn.fetch(_TABLES))
                indexes = tuple(
                    IndexHealth(r["name"], r["table_name"], r["size_bytes"], r["idx_scan"], r["is_unique"])
                    for r in await conn.fetch(_INDEXES)
                )
                by_state = {r["state"]: r["connections"] for r in await conn.fetch(_CONNECTIONS)}
                max_connections: int = await conn.fetchval("SELECT current_setting('max_connections')::int")
                open_transactions = tuple(
                    OpenTransaction(r["pid"], r["datname"], r["state"], r["age_s"])
                    for r in await conn.fetch(_OPEN_TRANSACTIONS)
                )
                slow_queries = await _slow_queries(conn, slow_query_threshold_s)
        database = DatabaseSummary(
            name=row["name"],
            size_bytes=row["size_bytes"],
            blocks_hit=row["blks_hit"],
            blocks_read=row["blks_read"],
            commits=row["xact_commit"],
            rollbacks=row["xact_rollback"],
            deadlocks=row["deadlocks"],
            conflicts=row["conflicts"],
            server_version=row["server_version"],
            stats_reset=row["stats_reset"],
        )
        connections = ConnectionReport(by_state, max_connections, pool)
        alerts = database_alerts(
            database, tables, indexes, connections, open_transactions, self._long_transaction_alert_s
        )
        return DatabaseReport(
            database, tables, indexes, connections, open_transactions, slow_queries, alerts, row["collected_at"]
        )


def _table(row: asyncpg.Record) -> TableHealth:
    return TableHealth(
        name=row["name"],
        live_rows=row["n_live_tup"],
        dead_rows=row["n_dead_tup"],
        table_size_bytes=row["table_size_bytes"],
        index_size_bytes=row["index_size_bytes"],
        last_vacuum=row["last_vacuum"],
        last_autovacuum=row["last_autovacuum"],
        last_analyze=row["last_analyze"],
        last_autoanalyze=row["last_autoanalyze"],
        sequential_scans=row["seq_scan"],
        index_scans=row["idx_scan"],
    )


async def _slow_queries(conn: asyncpg.Connection, threshold_s: float) -> SlowQueryReport:
    """From pg_stat_statements when installed here and readable; otherwise why not. The read runs in a
    savepoint so that its failure (not preloaded, no privilege) leaves the rest of the report intact."""
    schema = await conn.fetchval(_STATEMENTS_SCHEMA)
    if schema is None:
        return SlowQueryReport(False, NOT_INSTALLED, threshold_s)
    try:
        async with conn.transaction():
            rows = await conn.fetch(_SLOW_QUERIES.format(schema=schema, limit=MAX_SLOW_QUERIES), threshold_s * 1000)
    except asyncpg.PostgresError as exc:
        return SlowQueryReport(False, f"pg_stat_statements could not be read: {exc}", threshold_s)
    queries = tuple(
        SlowQuery(
            query=r["query"],
            calls=r["calls"],
            mean_s=r["mean_exec_time"] / 1000,
            max_s=r["max_exec_time"] / 1000,
            total_s=r["total_exec_time"] / 1000,
            rows=r["rows"],
        )
        for r in rows
    )
    return SlowQueryReport(True, "", threshold_s, queries)
