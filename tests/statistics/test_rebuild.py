"""`prefd rebuild-statistics`: one command forgets every figure and counts the retained feed again, beside
a running server's runner, after erasures and after a retention purge."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from prefd.v1 import audit_pb2, audit_pb2_grpc, preferences_pb2, preferences_pb2_grpc, statistics_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.db import init_connection
from tests.helpers.auth import auth
from tests.helpers.processes import ROOT, purge
from tests.helpers.requests import set_request, user
from tests.helpers.settings import make_settings
from tests.helpers.statistics import assert_statistics_match_the_database, wait_counted

ADMIN = auth("admin", sub="stats-rebuild")


async def rebuild(database_url: str) -> str:
    """Run `prefd rebuild-statistics` against the database; its output (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        "rebuild-statistics",
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


async def test_rebuild_from_scratch_is_one_command(fresh_database: Any, tmp_path: Path) -> None:
    dsn = await fresh_database()
    async with App(make_settings(dsn, tmp_path)) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        stats = statistics_pb2_grpc.StatisticsServiceStub(channel)
        db = await asyncpg.connect(dsn)
        await init_connection(db)
        try:
            for n in range(12):
                values: dict[str, Any] = {
                    "display.theme": ["dark", "light"][n % 2],
                    "display.items_per_page": 10 + n % 3,
                }
                await prefs.SetPreferences(set_request(user(f"bu{n}"), values), metadata=ADMIN)
            await prefs.SetPreferences(set_request(user("bu1"), {"display.theme": "system"}), metadata=ADMIN)
            await prefs.SetPreferences(
                set_request(user("bu2"), {"notifications.sms.phone_number": "+15550000003"}), metadata=ADMIN
            )
            await prefs.DeletePreferences(
                preferences_pb2.DeletePreferencesRequest(scope=user("bu3"), keys=["display.theme"], reason="r"),
                metadata=ADMIN,
            )
            await audit_pb2_grpc.AuditServiceStub(channel).EraseUserData(
                audit_pb2.EraseUserDataRequest(user_id="bu4", reason="gdpr"), metadata=ADMIN
            )
            await wait_counted(db, stats)
            await assert_statistics_match_the_database(db)
            # Figures gone wrong (by hand here) are what a rebuild is for.
            await db.execute("UPDATE statistics_keys SET holders = holders + 7 WHERE scope_kind = '*'")
            await db.execute("DELETE FROM statistics_values WHERE value_json = '\"dark\"'")

            out = await rebuild(dsn)
            assert out.startswith("statistics rebuilt from "), out
            assert "1 erasures" in out
            await wait_counted(db, stats)
            await assert_statistics_match_the_database(db)
            preference_changes = await db.fetchval("SELECT count(*) FROM changes WHERE kind = 'preference'")
            assert await db.fetchval("SELECT sum(changes) FROM statistics_daily") == preference_changes

            # After a retention purge the feed keeps each key's latest change: a rebuild still ends where
            # the database is.
            await purge(dsn)
            await rebuild(dsn)
            await wait_counted(db, stats)
            await assert_statistics_match_the_database(db)
            # The server's runner goes on counting from where the rebuild stopped.
            await prefs.SetPreferences(set_request(user("bu-after"), {"display.theme": "dark"}), metadata=ADMIN)
            await wait_counted(db, stats)
            await assert_statistics_match_the_database(db)
        finally:
            await db.close()
