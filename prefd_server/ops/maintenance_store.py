"""VACUUM, ANALYZE and REINDEX of prefd's own tables and indexes, and the maintenance log.

Targets come only from an allowlist: the names below that exist in the current schema, and the
indexes on them as the catalog lists them. A request's target is looked up in that set, and the
statement is built from the catalog's own name (a plain lower-case identifier, quoted), so no
request text ever reaches SQL. Each operation runs on its own connection outside a transaction
(VACUUM and REINDEX CONCURRENTLY refuse to run inside one) with no statement timeout, while the
log rows are written through the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import asyncpg

from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import MaintenanceInProgress, MaintenanceNotFound, invalid
from prefd_server.kernel.feed_store import append_change
from prefd_server.kernel.model import CallInfo, ChangeKind, Scope, ScopeKind
from prefd_server.ops.model import MaintenanceRecord, Operation, TargetKind

log = logging.getLogger(__name__)

# prefd's own tables: the only ones maintenance may touch (with their indexes).
PREFD_TABLES = frozenset(
    {
        "installation",
        "definitions",
        "preference_values",
        "changes",
        "feed_compactions",
        "ai_models",
        "ai_configs",
        "ai_api_keys",
        "ai_usage",
        "ai_usage_totals",
        "erasures",
        "maintenance_operations",
        "schema_migrations",
        "consent_ledger",
        "notification_throttles",
        "notification_throttle_charges",
        "statistics_position",
        "statistics_current",
        "statistics_values",
        "statistics_keys",
        "statistics_users",
        "statistics_totals",
        "statistics_daily",
        "preference_templates",
    }
)
_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_COLUMNS = """id, operation, target, full_vacuum, status, initiator, reason, created_at, started_at,
    finished_at, duration_ms, error"""


def _record(row: Any) -> MaintenanceRecord:
    return MaintenanceRecord(
        id=row["id"],
        operation=Operation[row["operation"]],
        target=row["target"],
        full=row["full_vacuum"],
        status=row["status"],
        initiator=row["initiator"],
        reason=row["reason"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_ms=row["duration_ms"],
        error=row["error"],
    )


async def allowed_targets(conn: asyncpg.Connection) -> dict[str, TargetKind]:
    """prefd's tables in the current schema and the indexes on them, by name."""
    rows = await conn.fetch(
        """SELECT c.relname AS name, c.relkind::text AS relkind FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
           LEFT JOIN pg_index i ON i.indexrelid = c.oid
           LEFT JOIN pg_class t ON t.oid = i.indrelid
           WHERE (c.relkind = 'r' AND c.relname = ANY($1::text[]))
              OR (c.relkind = 'i' AND t.relname = ANY($1::text[]))""",
        sorted(PREFD_TABLES),
    )
    return {
        row["name"]: TargetKind.TABLE if row["relkind"] == "r" else TargetKind.INDEX
        for row in rows
        if _PLAIN_IDENTIFIER.fullmatch(row["name"])
    }


def statement(operation: Operation, name: str, kind: TargetKind, full: bool) -> str:
    """The SQL for an allowlisted target (`name` comes from the catalog, never from a request)."""
    if not _PLAIN_IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    ident = f'"{name}"'
    if operation is Operation.REINDEX:
        return f"REINDEX {'TABLE' if kind is TargetKind.TABLE else 'INDEX'} CONCURRENTLY {ident}"
    if operation is Operation.ANALYZE:
        return f"ANALYZE {ident}"
    options = ["FULL"] if full else []
    if operation is Operation.VACUUM_ANALYZE:
        options.append("ANALYZE")
    return f"VACUUM ({', '.join(options)}) {ident}" if options else f"VACUUM {ident}"


class MaintenanceStore:
    """Starts operations in the background, records their course, and reads the log."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, appended: Callable[[int], None]) -> None:
        self.pool = pool
        self._dsn = dsn
        self._appended = appended
        self._running: dict[int, asyncio.Task[MaintenanceRecord]] = {}

    async def start(
        self, operation: Operation, target: str, full: bool, call: CallInfo, reason: str
    ) -> tuple[MaintenanceRecord, asyncio.Task[MaintenanceRecord]]:
        """Record the operation as queued and start it; INVALID_ARGUMENT for a target outside the
        allowlist or one the operation does not take, FAILED_PRECONDITION if one is unfinished."""
        async with translated_errors():
            async with self.pool.acquire() as conn:
                targets = await allowed_targets(conn)
            kind = targets.get(target)
            if kind is None:
                tables = ", ".join(sorted(t for t, k in targets.items() if k is TargetKind.TABLE))
                raise invalid("target", f"must be one of prefd's tables ({tables}) or an index on one")
            if kind is TargetKind.INDEX and operation is not Operation.REINDEX:
                raise invalid("target", f"{target} is an index; only REINDEX takes an index")
            sql = statement(operation, target, kind, full)
            runner = await asyncpg.connect(
                self._dsn, server_settings={"application_name": "prefd-maintenance", "statement_timeout": "0"}
            )
            try:
                record = await self._enqueue(operation, target, full, call, reason, runner.get_server_pid())
            except BaseException:
                await runner.close()
                raise
        task = asyncio.create_task(self._run(record, runner, sql, call), name=f"prefd-maintenance-{record.id}")
        self._running[record.id] = task
        task.add_done_callback(lambda done: self._forget(record.id, done))
        log.info("maintenance %d queued: %s %s", record.id, operation.name, target)
        return record, task

    def _forget(self, operation_id: int, task: asyncio.Task[MaintenanceRecord]) -> None:
        self._running.pop(operation_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Its log row stays unfinished; the next request on the target marks it interrupted.
            log.error("maintenance %d could not be recorded as finished: %s", operation_id, task.exception())

    async def _enqueue(
        self, operation: Operation, target: str, full: bool, call: CallInfo, reason: str, pid: int
    ) -> MaintenanceRecord:
        async with self.pool.acquire() as conn, conn.transaction():
            # An unfinished operation whose session is gone was interrupted (its process died).
            await conn.execute(
                """UPDATE maintenance_operations
                   SET status = 'failed', finished_at = clock_timestamp(),
                       error = 'interrupted: the session running it ended'
                   WHERE target = $1 AND status IN ('queued', 'running')
                     AND backend_pid NOT IN (SELECT pid FROM pg_stat_activity)""",
                target,
            )
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(
                        f"""INSERT INTO maintenance_operations
                                (operation, target, full_vacuum, status, initiator, reason, backend_pid)
                            VALUES ($1, $2, $3, 'queued', $4, $5, $6) RETURNING {_COLUMNS}""",
                        operation.name,
                        target,
                        full,
                        call.actor,
                        reason,
                        pid,
                    )
            except asyncpg.UniqueViolationError:
                busy = await conn.fetchval(
                    "SELECT id FROM maintenance_operations WHERE target = $1 AND status IN ('queued', 'running')",
                    target,
                )
                raise MaintenanceInProgress(target, busy) from None
        return _record(row)

    async def _run(
        self, record: MaintenanceRecord, runner: asyncpg.Connection, sql: str, call: CallInfo
    ) -> MaintenanceRecord:
        error = ""
        try:
            try:
                await self._set_running(record.id)
                log.info("maintenance %d running: %s", record.id, sql)
                await runner.execute(sql)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            error = "interrupted: the server stopped"
            runner.terminate()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._finish(record, error, call))
            raise
        finally:
            if not runner.is_closed():
                await runner.close()
        async with translated_errors():
            finished = await self._finish(record, error, call)
        log.info("maintenance %d %s in %.0f ms", record.id, finished.status, finished.duration_ms or 0)
        return finished

    async def _set_running(self, operation_id: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE maintenance_operations SET status = 'running', started_at = clock_timestamp()
                   WHERE id = $1""",
                operation_id,
            )

    async def _finish(self, record: MaintenanceRecord, error: str, call: CallInfo) -> MaintenanceRecord:
        """Mark the operation completed or failed and append its change row, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE maintenance_operations
                    SET status = $2, error = $3, finished_at = clock_timestamp(),
                        duration_ms = extract(epoch FROM clock_timestamp() - coalesce(started_at, created_at)) * 1000
                    WHERE id = $1 RETURNING {_COLUMNS}""",
                record.id,
                "failed" if error else "completed",
                error,
            )
            finished = _record(row)
            xid = await append_change(
                conn,
                ChangeKind.MAINTENANCE,
                Scope(ScopeKind.GLOBAL),
                f"maintenance/{record.id}",
                None,
                {
                    "operation": record.operation.name,
                    "target": record.target,
                    "full": record.full,
                    "status": finished.status,
                    "duration_ms": finished.duration_ms,
                    "error": error,
                },
                0,
                call,
                record.reason,
            )
        self._appended(xid)
        return finished

    async def get(self, operation_id: int) -> MaintenanceRecord:
        async with translated_errors(), self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM maintenance_operations WHERE id = $1", operation_id)
        if row is None:
            raise MaintenanceNotFound(operation_id)
        return _record(row)

    async def page(self, target: str, before_id: int | None, limit: int) -> list[MaintenanceRecord]:
        """Newest first, below `before_id`."""
        async with translated_errors(), self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_COLUMNS} FROM maintenance_operations
                    WHERE ($1 = '' OR target = $1) AND ($2::bigint IS NULL OR id < $2)
                    ORDER BY id DESC LIMIT $3""",
                target,
                before_id,
                limit,
            )
        return [_record(row) for row in rows]

    async def stop(self, grace_s: float) -> None:
        """Let running operations finish within the grace period, then interrupt them."""
        tasks = list(self._running.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
