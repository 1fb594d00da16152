"""RunMaintenance over real gRPC: allowlist, permission, confirmation, one operation per target, the log."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from prefd.v1 import health_pb2, health_pb2_grpc
from prefd_server.ops.maintenance_store import PREFD_TABLES
from tests.helpers.auth import auth
from tests.helpers.requests import error_reason, eventually, field_violations

ADMIN = auth("admin", "dba-on-call")
VACUUM = health_pb2.MAINTENANCE_OPERATION_VACUUM
ANALYZE = health_pb2.MAINTENANCE_OPERATION_ANALYZE
REINDEX = health_pb2.MAINTENANCE_OPERATION_REINDEX
COMPLETED = health_pb2.MAINTENANCE_STATUS_COMPLETED
FAILED = health_pb2.MAINTENANCE_STATUS_FAILED
RUNNING = health_pb2.MAINTENANCE_STATUS_RUNNING


@pytest.fixture(scope="session")
def health(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthServiceStub:
    return health_pb2_grpc.HealthServiceStub(channel)


async def _run(health, **fields) -> health_pb2.MaintenanceRecord:
    reply = await health.RunMaintenance(health_pb2.RunMaintenanceRequest(**fields), metadata=ADMIN)
    return reply.operation


async def _until(health, operation_id: int, statuses: set[int], deadline_s: float = 20) -> health_pb2.MaintenanceRecord:
    """Poll GetMaintenanceOperation until the operation reaches one of `statuses`."""
    latest: list[health_pb2.MaintenanceRecord] = []

    async def reached() -> bool:
        reply = await health.GetMaintenanceOperation(
            health_pb2.GetMaintenanceOperationRequest(id=operation_id), metadata=ADMIN
        )
        latest[:] = [reply.operation]
        return reply.operation.status in statuses

    await eventually(reached, deadline_s)
    return latest[0]


async def _wait_for_lock_wait(db: asyncpg.Connection) -> int:
    """The pid of the maintenance session once it is blocked on a lock."""
    pids: list[int] = []

    async def blocked() -> bool:
        pid = await db.fetchval(
            """SELECT pid FROM pg_stat_activity
               WHERE application_name = 'prefd-maintenance' AND wait_event_type = 'Lock'"""
        )
        pids[:] = [pid] if pid else []
        return bool(pid)

    await eventually(blocked, 20)
    return pids[0]


async def test_a_completed_vacuum_is_in_the_log_with_its_duration(health, db) -> None:
    before = await db.fetchval("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'preference_values'")
    done = await _run(health, operation=VACUUM, target="preference_values", reason="weekly", wait=True)
    assert (done.status, done.target, done.initiator, done.reason) == (
        COMPLETED,
        "preference_values",
        "dba-on-call",
        "weekly",
    )
    assert done.duration.ToNanoseconds() > 0 and done.end_time.ToDatetime() >= done.start_time.ToDatetime()
    assert not done.error
    listed = await health.ListMaintenanceOperations(
        health_pb2.ListMaintenanceOperationsRequest(target="preference_values"), metadata=ADMIN
    )
    assert listed.operations[0] == done

    # PostgreSQL ran it: the table's vacuum count moved (statistics arrive asynchronously).
    async def counted() -> bool:
        count = await db.fetchval("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'preference_values'")
        return bool(count > before)

    await eventually(counted, 10)
    # The operation is also in the change history.
    change = await db.fetchrow("SELECT kind, actor, new_value FROM changes WHERE key = $1", f"maintenance/{done.id}")
    assert change["kind"] == "maintenance" and change["actor"] == "dba-on-call"
    assert change["new_value"]["status"] == "completed" and change["new_value"]["operation"] == "VACUUM"


async def test_without_wait_it_returns_queued_and_finishes_in_the_background(health) -> None:
    started = await _run(health, operation=ANALYZE, target="changes")
    assert started.status == health_pb2.MAINTENANCE_STATUS_QUEUED and not started.HasField("end_time")
    finished = await _until(health, started.id, {COMPLETED, FAILED})
    assert finished.status == COMPLETED and finished.HasField("duration")


async def test_reindex_of_one_index_and_vacuum_full_with_confirmation(health, db) -> None:
    done = await _run(health, operation=REINDEX, target="changes_feed", wait=True)
    assert done.status == COMPLETED, done.error
    before = await db.fetchval("SELECT pg_relation_filenode('feed_compactions')")
    full = await _run(health, operation=VACUUM, target="feed_compactions", full=True, confirm_full=True, wait=True)
    assert full.status == COMPLETED and full.full
    assert await db.fetchval("SELECT pg_relation_filenode('feed_compactions')") != before  # rewritten


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"operation": VACUUM, "target": "pg_class"}, "target"),
        ({"operation": VACUUM, "target": 'changes"; DROP TABLE changes; --'}, "target"),
        ({"operation": VACUUM, "target": ""}, "target"),
        ({"operation": VACUUM, "target": "changes_feed"}, "target"),  # an index: REINDEX only
        ({"operation": 0, "target": "changes"}, "operation"),
        ({"operation": 42, "target": "changes"}, "operation"),
        ({"operation": VACUUM, "target": "changes", "full": True}, "confirm_full"),
        ({"operation": ANALYZE, "target": "changes", "full": True, "confirm_full": True}, "full"),
    ],
)
async def test_bad_requests_are_refused_and_nothing_runs(health, db, fields, field) -> None:
    logged = await db.fetchval("SELECT count(*) FROM maintenance_operations")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.RunMaintenance(health_pb2.RunMaintenanceRequest(wait=True, **fields), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value), field_violations(err.value)
    assert await db.fetchval("SELECT count(*) FROM maintenance_operations") == logged
    assert await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'prefd-maintenance'") == 0


async def test_only_admins_run_or_read_maintenance(health, db) -> None:
    logged = await db.fetchval("SELECT count(*) FROM maintenance_operations")
    for metadata in (auth("user", "alice"), auth("service", "worker")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.RunMaintenance(
                health_pb2.RunMaintenanceRequest(operation=VACUUM, target="changes", wait=True), metadata=metadata
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.ListMaintenanceOperations(health_pb2.ListMaintenanceOperationsRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await db.fetchval("SELECT count(*) FROM maintenance_operations") == logged
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.GetMaintenanceOperation(health_pb2.GetMaintenanceOperationRequest(id=10**12), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_one_operation_per_target_at_a_time_and_failures_are_recorded(health, app) -> None:
    blocker = await asyncpg.connect(app.dsn)
    observer = await asyncpg.connect(app.dsn)
    try:
        # Hold a lock VACUUM needs, so the first operation stays running.
        await blocker.execute("BEGIN; LOCK TABLE ai_usage_totals IN SHARE UPDATE EXCLUSIVE MODE")
        first = await _run(health, operation=VACUUM, target="ai_usage_totals")
        pid = await _wait_for_lock_wait(observer)
        assert (await _until(health, first.id, {RUNNING})).status == RUNNING

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _run(health, operation=ANALYZE, target="ai_usage_totals", wait=True)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(err.value) == "MAINTENANCE_IN_PROGRESS"
        # Another target is not held up.
        other = await _run(health, operation=ANALYZE, target="ai_models", wait=True)
        assert other.status == COMPLETED

        # Cancelling the running statement makes the operation fail, with PostgreSQL's error.
        assert await observer.fetchval("SELECT pg_cancel_backend($1)", pid)
        failed = await _until(health, first.id, {COMPLETED, FAILED})
        assert failed.status == FAILED and "cancel" in failed.error.lower()
        await blocker.execute("ROLLBACK")
        again = await _run(health, operation=ANALYZE, target="ai_usage_totals", wait=True)
        assert again.status == COMPLETED
    finally:
        await blocker.close()
        await observer.close()


async def test_the_log_pages_newest_first(health) -> None:
    ids = [(await _run(health, operation=ANALYZE, target="erasures", wait=True)).id for _ in range(3)]
    request = health_pb2.ListMaintenanceOperationsRequest(target="erasures", page_size=2)
    first = await health.ListMaintenanceOperations(request, metadata=ADMIN)
    request.page_token = first.next_page_token
    second = await health.ListMaintenanceOperations(request, metadata=ADMIN)
    seen = [op.id for op in (*first.operations, *second.operations)]
    assert seen[:3] == ids[::-1] and len(seen) == len(set(seen))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.ListMaintenanceOperations(
            health_pb2.ListMaintenanceOperationsRequest(target="changes", page_token=first.next_page_token),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(err.value)


async def test_an_operation_whose_session_died_is_marked_interrupted(health, db) -> None:
    # As left by a prefd process that died mid-operation: running, on a session that no longer exists.
    orphan = await db.fetchval(
        """INSERT INTO maintenance_operations (operation, target, status, initiator, backend_pid, started_at)
           VALUES ('VACUUM', 'definitions', 'running', 'gone', 2147483647, now()) RETURNING id"""
    )
    done = await _run(health, operation=ANALYZE, target="definitions", wait=True)
    assert done.status == COMPLETED
    interrupted = await _until(health, orphan, {FAILED}, deadline_s=1)
    assert "interrupted" in interrupted.error


async def test_every_table_the_migrations_create_may_be_maintained(db: asyncpg.Connection) -> None:
    """A table a migration adds is prefd's own: maintenance may vacuum, analyze and reindex it."""
    created = {
        r["tablename"] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert created == PREFD_TABLES
