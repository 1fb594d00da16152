"""GetDatabaseHealth over real gRPC: the figures against PostgreSQL's own catalogs, real bloat, a real
long transaction, pg_stat_statements present, absent and unloadable, and the alert thresholds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from prefd.v1 import health_pb2, health_pb2_grpc, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.db import PoolStats
from prefd_server.ops.model import (
    ConnectionReport,
    DatabaseSummary,
    IndexHealth,
    OpenTransaction,
    Severity,
    TableHealth,
)
from prefd_server.ops.rules import database_alerts
from tests.helpers.auth import auth, unique
from tests.helpers.requests import eventually, field_violations, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


@dataclass(frozen=True)
class PrivateServer:
    """A prefd server on a database nothing else writes to, alerting on transactions over 0.5 s."""

    app: App
    url: str
    health: health_pb2_grpc.HealthServiceStub
    preferences: preferences_pb2_grpc.PreferencesServiceStub


@pytest.fixture(scope="module")
async def private(fresh_database: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateServer]:
    url = await fresh_database()
    settings = make_settings(url, tmp_path_factory.mktemp("dbhealth"), long_transaction_alert_s=0.5)
    async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield PrivateServer(
            app,
            url,
            health_pb2_grpc.HealthServiceStub(channel),
            preferences_pb2_grpc.PreferencesServiceStub(channel),
        )


@pytest.fixture(scope="module")
def health(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthServiceStub:
    """HealthService on the shared test server."""
    return health_pb2_grpc.HealthServiceStub(channel)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _time(message: Any, field: str) -> datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=UTC) if message.HasField(field) else None


async def _report(
    health: health_pb2_grpc.HealthServiceStub, threshold_s: float | None = None
) -> health_pb2.GetDatabaseHealthResponse:
    request = health_pb2.GetDatabaseHealthRequest()
    if threshold_s is not None:
        request.slow_query_threshold.CopyFrom(_duration(threshold_s))
    reply: health_pb2.GetDatabaseHealthResponse = await health.GetDatabaseHealth(request, metadata=ADMIN)
    return reply


@dataclass(frozen=True)
class CatalogFigures:
    """What PostgreSQL says, read by the test itself: `stable` parts only move on writes, `counters` only grow."""

    stable: dict[str, Any]
    counters: dict[str, Any]


async def _catalog_figures(db: asyncpg.Connection) -> CatalogFigures:
    tables = {
        r["relname"]: tuple(r.values())[1:]
        for r in await db.fetch(
            """SELECT relname, n_live_tup, n_dead_tup, pg_table_size(relid), pg_indexes_size(relid),
                      last_vacuum, last_autovacuum, last_analyze, last_autoanalyze
               FROM pg_stat_user_tables WHERE schemaname = 'public'"""
        )
    }
    indexes = {
        (r["tablename"], r["indexname"]): (r["size"], r["is_unique"])
        for r in await db.fetch(
            """SELECT x.tablename, x.indexname, pg_relation_size(i.indexrelid) AS size,
                      i.indisunique OR i.indisprimary AS is_unique
               FROM pg_indexes x
               JOIN pg_index i ON i.indexrelid = format('%I.%I', x.schemaname, x.indexname)::regclass
               WHERE x.schemaname = 'public'"""
        )
    }
    database = await db.fetchrow(
        """SELECT pg_database_size(current_database()) AS size, stats_reset, xact_commit, xact_rollback,
                  deadlocks, conflicts
           FROM pg_stat_database WHERE datname = current_database()"""
    )
    scans = {
        r["relname"]: (r["seq_scan"], r["idx_scan"])
        for r in await db.fetch(
            """SELECT relname, coalesce(seq_scan, 0) AS seq_scan, coalesce(idx_scan, 0) AS idx_scan
               FROM pg_stat_user_tables WHERE schemaname = 'public'"""
        )
    }
    index_scans = {
        (r["relname"], r["indexrelname"]): r["idx_scan"]
        for r in await db.fetch(
            "SELECT relname, indexrelname, idx_scan FROM pg_stat_user_indexes WHERE schemaname = 'public'"
        )
    }
    return CatalogFigures(
        stable={
            "tables": tables,
            "indexes": indexes,
            "size": database["size"],
            "stats_reset": database["stats_reset"],
        },
        counters={
            "scans": scans,
            "index_scans": index_scans,
            "commits": database["xact_commit"],
            "rollbacks": database["xact_rollback"],
            "deadlocks": database["deadlocks"],
            "conflicts": database["conflicts"],
            "now": await db.fetchval("SELECT now()"),
        },
    )


async def test_the_report_matches_the_catalogs(private: PrivateServer) -> None:
    alice = user(unique("u"))
    await private.preferences.SetPreferences(
        set_request(alice, {"display.items_per_page": 40, "display.theme": "dark"}), metadata=ADMIN
    )
    async with connect(private.url) as db:
        # Give last_vacuum and last_analyze values, so that the comparison covers set timestamps too.
        await db.execute("VACUUM ANALYZE preference_values")
        await db.execute("ANALYZE changes")
        # Statistics reach the views up to a second after the writes; take a report between two equal reads.
        async with asyncio.timeout(15):
            while True:
                before = await _catalog_figures(db)
                reply = await _report(private.health)
                after = await _catalog_figures(db)
                if before.stable == after.stable:
                    break
        second = await _report(private.health)
        max_connections = int(await db.fetchval("SHOW max_connections"))
        server_version = await db.fetchval("SHOW server_version")
        database_name = await db.fetchval("SELECT current_database()")

    tables = before.stable["tables"]
    assert [t.name for t in reply.tables] == sorted(tables)
    assert {"changes", "preference_values"} <= set(tables)
    for table in reply.tables:
        assert (
            table.live_rows,
            table.dead_rows,
            table.table_size_bytes,
            table.index_size_bytes,
            _time(table, "last_vacuum_time"),
            _time(table, "last_autovacuum_time"),
            _time(table, "last_analyze_time"),
            _time(table, "last_autoanalyze_time"),
        ) == tables[table.name], table.name
        rows = table.live_rows + table.dead_rows
        assert table.bloat_percent == pytest.approx(table.dead_rows / rows * 100 if rows else 0.0)
        seq_before, idx_before = before.counters["scans"][table.name]
        seq_after, idx_after = after.counters["scans"][table.name]
        assert seq_before <= table.sequential_scans <= seq_after
        assert idx_before <= table.index_scans <= idx_after
    by_name = {t.name: t for t in reply.tables}
    assert by_name["preference_values"].live_rows >= 2
    assert by_name["preference_values"].HasField("last_vacuum_time")
    assert by_name["changes"].HasField("last_analyze_time")

    # The index list is pg_indexes for the schema, in (table, name) order, with sizes and uniqueness.
    keys = [(i.table, i.name) for i in reply.indexes]
    assert keys == sorted(keys)
    assert {key: (i.size_bytes, i.unique) for key, i in zip(keys, reply.indexes, strict=True)} == before.stable[
        "indexes"
    ]
    for index in reply.indexes:
        key = (index.table, index.name)
        assert before.counters["index_scans"][key] <= index.scans <= after.counters["index_scans"][key]
        assert index.unused == (index.scans == 0 and not index.unique)
    pkeys = [i for i in reply.indexes if i.name.endswith("_pkey")]
    assert {"changes_pkey", "preference_values_pkey"} <= {i.name for i in pkeys}
    assert all(i.unique and not i.unused for i in pkeys)
    # A primary key nobody has scanned yet is still not flagged: it enforces a rule.
    assert any(i.scans == 0 for i in pkeys)
    assert {a.target for a in reply.alerts if a.code == "INDEX_UNUSED"} == {i.name for i in reply.indexes if i.unused}

    database = reply.database
    assert database.name == database_name
    assert database.size_bytes == before.stable["size"]
    assert database.server_version == server_version
    assert _time(database, "stats_reset_time") == before.stable["stats_reset"]
    for field in ("commits", "rollbacks", "deadlocks", "conflicts"):
        assert before.counters[field] <= getattr(database, field) <= after.counters[field], field
    assert second.database.commits >= database.commits
    assert 0 < database.cache_hit_ratio <= 1
    assert before.counters["now"] <= reply.collect_time.ToDatetime(tzinfo=UTC) <= after.counters["now"]

    connections = reply.connections
    assert connections.max_connections == max_connections
    assert connections.total == sum(connections.by_state.values())
    assert connections.used_fraction == pytest.approx(connections.total / max_connections)
    # The report's own backend is active while it reads pg_stat_activity, and holds a pooled connection.
    assert connections.by_state["active"] >= 1
    pool = connections.pool
    assert pool.in_use >= 1 and pool.size == pool.in_use + pool.idle
    assert (pool.min_size, pool.max_size) == (private.app.settings.db_pool_min, private.app.settings.db_pool_max)
    assert connections.total >= pool.size

    # No threshold in the request: the server's setting (500 ms) applies.
    assert _seconds(reply.slow_queries.threshold) == pytest.approx(0.5)


async def _dead_rows(db: asyncpg.Connection, table: str) -> int:
    dead: int = await db.fetchval(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = $1", table
    )
    return dead


async def test_dead_rows_written_through_the_api_raise_table_bloat(private: PrivateServer) -> None:
    updates = 80
    async with connect(private.url) as db:
        await db.execute("ALTER TABLE preference_values SET (autovacuum_enabled = false)")
        try:
            dead_before = await _dead_rows(db, "preference_values")
            alice = user(unique("u"))
            # Each write of the same key updates its row, leaving the old version dead.
            for i in range(updates + 1):
                await private.preferences.SetPreferences(
                    set_request(alice, {"display.items_per_page": 100 + i}), metadata=ADMIN
                )

            async def dead_rows_visible() -> bool:
                # A backend publishes its statistics at most once a second and then only when it next
                # finishes a statement (or after 10 s idle): reports running on every pooled connection at
                # once get the writers' counts published soon.
                await asyncio.gather(*(_report(private.health) for _ in range(private.app.pool.get_size())))
                return await _dead_rows(db, "preference_values") >= dead_before + updates

            await eventually(dead_rows_visible, 15, 0.1)
            reply = await _report(private.health)
        finally:
            await db.execute("ALTER TABLE preference_values RESET (autovacuum_enabled)")

    table = next(t for t in reply.tables if t.name == "preference_values")
    assert table.dead_rows >= dead_before + updates
    assert table.bloat_percent > 50
    bloat = [a for a in reply.alerts if a.code == "TABLE_BLOAT"]
    assert [a.target for a in bloat] == ["preference_values"]
    alert = bloat[0]
    assert alert.severity == health_pb2.ALERT_SEVERITY_CRITICAL
    assert alert.value == pytest.approx(table.bloat_percent)
    assert alert.threshold == 50
    assert "preference_values" in alert.message


async def test_a_transaction_holding_an_xid_raises_long_transaction(private: PrivateServer) -> None:
    async with connect(private.url) as holder, connect(private.url) as idle:
        transaction = holder.transaction()
        await transaction.start()
        # A transaction open as long but holding neither an xid nor a snapshot is no alert.
        idle_transaction = idle.transaction()
        await idle_transaction.start()
        await idle.execute("SELECT 1")  # the simple protocol: no portal keeps a snapshot afterwards
        try:
            await holder.fetchval("SELECT pg_current_xact_id()")
            pid, idle_pid = holder.get_server_pid(), idle.get_server_pid()
            found: list[health_pb2.DatabaseAlert] = []
            report: list[health_pb2.GetDatabaseHealthResponse] = []

            async def alerted() -> bool:
                reply = await _report(private.health)
                found[:] = [a for a in reply.alerts if a.code == "LONG_TRANSACTION" and a.target == f"pid {pid}"]
                report[:] = [reply]
                return bool(found)

            await eventually(alerted, 10, 0.1)
        finally:
            await transaction.rollback()
            await idle_transaction.rollback()
        alert = found[0]
        assert str(pid) in alert.target
        assert alert.severity == health_pb2.ALERT_SEVERITY_WARNING
        assert alert.threshold == pytest.approx(0.5) and alert.value > 0.5
        assert not [a for a in report[0].alerts if a.target == f"pid {idle_pid}"]
        # Once it ends, so does the alert.
        after = await _report(private.health)
        assert not [a for a in after.alerts if a.target == f"pid {pid}"]


async def test_slow_queries_need_pg_stat_statements_installed(health: health_pb2_grpc.HealthServiceStub) -> None:
    reply = await _report(health, 0.25)
    slow = reply.slow_queries
    assert not slow.available and not slow.queries
    assert "not installed" in slow.unavailable_reason
    assert "CREATE EXTENSION pg_stat_statements" in slow.unavailable_reason
    assert _seconds(slow.threshold) == pytest.approx(0.25)
    # The rest of the report is there regardless.
    assert reply.tables and reply.indexes and reply.connections.total >= 1


async def test_only_admins_may_read_the_report(health: health_pb2_grpc.HealthServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.GetDatabaseHealth(health_pb2.GetDatabaseHealthRequest(), metadata=auth("user", "someone"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_negative_threshold_is_invalid(health: health_pb2_grpc.HealthServiceStub) -> None:
    request = health_pb2.GetDatabaseHealthRequest(slow_query_threshold=duration_pb2.Duration(seconds=-1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.GetDatabaseHealth(request, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "slow_query_threshold" in field_violations(err.value)


def _summary(hit: int, read: int) -> DatabaseSummary:
    return DatabaseSummary("prefd", 1, hit, read, 0, 0, 0, 0, "15", None)


def _table(name: str, live: int, dead: int) -> TableHealth:
    return TableHealth(name, live, dead, 0, 0, None, None, None, None, 0, 0)


def _connections(total: int, max_connections: int = 100) -> ConnectionReport:
    return ConnectionReport({"idle": total}, max_connections, PoolStats(1, 1, 0, 0, 1, 10))


def _alerts(**figures: Any) -> list[tuple[str, Severity, str, float, float]]:
    arguments: dict[str, Any] = {
        "database": _summary(0, 0),
        "tables": [],
        "indexes": [],
        "connections": _connections(1),
        "open_transactions": [],
        "long_transaction_alert_s": 60.0,
        **figures,
    }
    return [(a.code, a.severity, a.target, round(a.value, 4), a.threshold) for a in database_alerts(**arguments)]


def test_alert_thresholds() -> None:
    assert _alerts() == []
    # Bloat: over 20% of at least 50 rows; CRITICAL over 50%.
    assert _alerts(tables=[_table("a", 40, 10), _table("b", 80, 20)]) == []
    assert _alerts(tables=[_table("tiny", 1, 48)]) == []
    assert _alerts(tables=[_table("t", 79, 21)]) == [("TABLE_BLOAT", Severity.WARNING, "t", 21.0, 20.0)]
    assert _alerts(tables=[_table("t", 50, 50)]) == [("TABLE_BLOAT", Severity.WARNING, "t", 50.0, 20.0)]
    assert _alerts(tables=[_table("t", 49, 51)]) == [("TABLE_BLOAT", Severity.CRITICAL, "t", 51.0, 50.0)]
    # Cache hit ratio: under 0.99 once 1,000 blocks were asked for.
    assert _alerts(database=_summary(0, 0)) == []
    assert _alerts(database=_summary(900, 99)) == []
    assert _alerts(database=_summary(990, 10)) == []
    assert _alerts(database=_summary(980, 20)) == [("CACHE_HIT_RATIO_LOW", Severity.WARNING, "prefd", 0.98, 0.99)]
    # Connections: over 80% of max_connections; CRITICAL over 95%.
    assert _alerts(connections=_connections(80)) == []
    assert _alerts(connections=_connections(81)) == [("CONNECTIONS_HIGH", Severity.WARNING, "prefd", 0.81, 0.8)]
    assert _alerts(connections=_connections(95)) == [("CONNECTIONS_HIGH", Severity.WARNING, "prefd", 0.95, 0.8)]
    assert _alerts(connections=_connections(96)) == [("CONNECTIONS_HIGH", Severity.CRITICAL, "prefd", 0.96, 0.95)]
    # Indexes: never scanned and enforcing no uniqueness.
    indexes = [
        IndexHealth("t_pkey", "t", 8192, 0, True),
        IndexHealth("t_used", "t", 8192, 3, False),
        IndexHealth("t_unused", "t", 8192, 0, False),
    ]
    assert _alerts(indexes=indexes) == [("INDEX_UNUSED", Severity.WARNING, "t_unused", 0.0, 0.0)]
    # Transactions: open longer than the setting.
    transactions = [OpenTransaction(7, "prefd", "idle in transaction", 0.4), OpenTransaction(8, "prefd", "active", 0.6)]
    assert _alerts(open_transactions=transactions, long_transaction_alert_s=0.5) == [
        ("LONG_TRANSACTION", Severity.WARNING, "pid 8", 0.6, 0.5)
    ]
    assert _alerts(open_transactions=transactions, long_transaction_alert_s=0.6) == []
