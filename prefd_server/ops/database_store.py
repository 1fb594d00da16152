"""SQL over PostgreSQL's statistics views for GetDatabaseHealth, read into one DatabaseReport.

One report is one read: a REPEATABLE READ, read-only transaction on one pooled connection, with
`stats_fetch_consistency = snapshot` so every statistics view answers from the same snapshot.
"""

from __future__ import annotations

import asyncpg

from prefd_server.kernel.db import pool_stats, translated_errors
from prefd_server.ops.model import (
    ConnectionReport,
    DatabaseReport,
    DatabaseSummary,
    IndexHealth,
    OpenTransaction,
    SlowQuery,
    SlowQueryReport,
    TableHealth,
)
from prefd_server.ops.rules import database_alerts

MAX_SLOW_QUERIES = 20
# Open transactions read for LONG_TRANSACTION, oldest first; alerts beyond this many add nothing.
MAX_OPEN_TRANSACTIONS = 100

NOT_INSTALLED = (
    "the pg_stat_statements extension is not installed in this database "
    "(CREATE EXTENSION pg_stat_statements; it also needs shared_preload_libraries)"
)


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
