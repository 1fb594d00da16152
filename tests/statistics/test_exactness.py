"""The statistics equal a GROUP BY over the database after concurrent writes, resets, deletes and erasures;
a consumer killed mid-batch counts nothing twice; one runner counts across processes."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2, preferences_pb2_grpc, statistics_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.db import init_connection
from tests.helpers.auth import auth
from tests.helpers.requests import GLOBAL, eventually, org, set_request, user
from tests.helpers.settings import make_settings
from tests.helpers.statistics import assert_statistics_match_the_database, wait_counted

ADMIN = auth("admin", sub="stats-load")
KEY_WRITES = 20_000
CLIENTS = 32
USERS = 400
ORGS = 8
# Small value sets, so that values are shared by many holders and counts move both ways.
VALUES: dict[str, list[Any]] = {
    "display.theme": ["light", "dark", "system"],
    "display.dashboard_layout": ["grid", "list", "compact"],
    "display.items_per_page": [10, 25, 50, 100],
    "locale.language": ["en", "fr", "de", "ja"],
    "locale.timezone": ["UTC", "Europe/Paris", "Asia/Tokyo"],
    "notifications.sms.phone_number": ["+15550000001", "+15550000002"],  # sensitive, USER scope only
}
ORG_KEYS = [k for k in VALUES if k != "notifications.sms.phone_number"]


async def start_app(dsn: str, data_dir: Path) -> App:
    app = App(make_settings(dsn, data_dir))
    await app.start()
    return app


@pytest.fixture
async def own_app(fresh_database: Any, tmp_path: Path) -> AsyncIterator[App]:
    """A server on a database of its own (these tests write GLOBAL overrides and change triggers)."""
    async with App(make_settings(await fresh_database(), tmp_path)) as running:
        yield running


@pytest.fixture
async def own_db(own_app: App) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(own_app.dsn)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


class Load:
    """Random writes, deletes, resets and erasures from concurrent clients, counting key-level writes."""

    def __init__(self, channel: grpc.aio.Channel, seed: int) -> None:
        self.prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)
        self.rng = random.Random(seed)
        self.key_writes = 0
        self.calls: Counter[str] = Counter()

    def scope(self) -> Any:
        roll = self.rng.random()
        if roll < 0.9:
            return user(f"lu{self.rng.randrange(USERS)}")
        return org(f"lo{self.rng.randrange(ORGS)}") if roll < 0.99 else GLOBAL

    async def one(self) -> None:
        scope = self.scope()
        keys = list(VALUES) if scope.id.startswith("lu") else ORG_KEYS
        roll = self.rng.random()
        if roll < 0.7:
            chosen = self.rng.sample(keys, self.rng.randint(1, 4))
            request = set_request(scope, {k: self.rng.choice(VALUES[k]) for k in chosen}, reason="load")
            if scope.kind == common_pb2.SCOPE_KIND_USER:
                # Mostly the user's own org; sometimes another (the user moved) or none.
                home = f"lo{int(scope.id[2:]) % ORGS}"
                request.org_id = self.rng.choices([home, f"lo{self.rng.randrange(ORGS)}", ""], [8, 1, 1])[0]
            await self.prefs.SetPreferences(request, metadata=ADMIN)
            self.key_writes += len(chosen)
            self.calls["set"] += 1
        elif roll < 0.9:
            chosen = self.rng.sample(keys, self.rng.randint(1, 3))
            request = preferences_pb2.DeletePreferencesRequest(scope=scope, keys=chosen, reason="load")
            await self.prefs.DeletePreferences(request, metadata=ADMIN)
            self.key_writes += len(chosen)
            self.calls["delete"] += 1
        elif roll < 0.998:
            category = self.rng.choice(["display", "locale", ""])
            request = preferences_pb2.ResetPreferencesRequest(scope=scope, category=category, reason="load")
            answer = await self.prefs.ResetPreferences(request, metadata=ADMIN)
            self.key_writes += max(1, len(answer.changes))
            self.calls["reset"] += 1
        else:
            request = audit_pb2.EraseUserDataRequest(user_id=f"lu{self.rng.randrange(USERS)}", reason="load")
            await self.audit.EraseUserData(request, metadata=ADMIN)
            self.calls["erase"] += 1

    async def client(self) -> None:
        while self.key_writes < KEY_WRITES:
            try:
                await self.one()
            except grpc.aio.AioRpcError as error:
                # Concurrent writers of one scope may conflict; nothing else is expected.
                assert error.code() == grpc.StatusCode.ABORTED, error
                self.calls["aborted"] += 1


async def test_statistics_equal_a_group_by_after_concurrent_writes_resets_deletes_and_erasures(
    own_app: App, own_db: asyncpg.Connection
) -> None:
    began = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{own_app.port}") as channel:
        load = Load(channel, seed=4)
        await asyncio.gather(*(load.client() for _ in range(CLIENTS)))
        print(f"{load.key_writes} key writes in {time.monotonic() - began:.1f} s: {dict(load.calls)}")
        assert load.key_writes >= KEY_WRITES and load.calls["erase"] > 0 and load.calls["reset"] > 0
        await wait_counted(own_db, statistics_pb2_grpc.StatisticsServiceStub(channel))
    expected = await assert_statistics_match_the_database(own_db)
    # The load left a spread of values behind (so the equality above is not between empty tables).
    assert sum(n for (key, org, kind), n in expected["holders"].items() if org == "" and kind == "*") > 1000
    assert sum(n for (key, org, kind), n in expected["holders"].items() if org == "lo3" and kind == "USER") > 100
    changes = await own_db.fetchval("SELECT count(*) FROM changes WHERE kind = 'preference'")
    daily = await own_db.fetchval("SELECT sum(changes) FROM statistics_daily")
    assert daily == changes


async def test_a_consumer_killed_mid_batch_counts_nothing_twice(own_app: App, own_db: asyncpg.Connection) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{own_app.port}") as channel:
        prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        stats = statistics_pb2_grpc.StatisticsServiceStub(channel)
        for n in range(20):
            await prefs.SetPreferences(set_request(user(f"cu{n}"), {"display.theme": "dark"}), metadata=ADMIN)
        await wait_counted(own_db, stats)
        # The next batch's last statement (its daily rows, after its figures, counted rows and new position
        # were written) kills its own connection: everything the batch wrote is in the dead transaction.
        await own_db.execute(
            """CREATE SEQUENCE statistics_crashes;
               CREATE FUNCTION crash_once() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF nextval('statistics_crashes') = 1 THEN
                       PERFORM pg_terminate_backend(pg_backend_pid());
                   END IF;
                   RETURN NULL;
               END $$;
               CREATE TRIGGER crash_once BEFORE INSERT ON statistics_daily
                   FOR EACH STATEMENT EXECUTE FUNCTION crash_once();"""
        )
        try:
            for n in range(20):
                values = {"display.theme": "light", "locale.language": "fr"}
                await prefs.SetPreferences(set_request(user(f"cu{n}"), values), metadata=ADMIN)
            await prefs.SetPreferences(set_request(user("cu-late"), {"display.theme": "dark"}), metadata=ADMIN)

            async def crashed_and_resumed() -> bool:
                calls: int = await own_db.fetchval("SELECT last_value FROM statistics_crashes")
                return calls >= 2

            await eventually(crashed_and_resumed, 20)
            await wait_counted(own_db, stats)
        finally:
            await own_db.execute("DROP TRIGGER crash_once ON statistics_daily; DROP FUNCTION crash_once()")
    expected = await assert_statistics_match_the_database(own_db)
    assert expected["values"][("display.theme", "", "USER", '"light"')] == 20
    assert expected["values"][("display.theme", "", "USER", '"dark"')] == 1


async def test_one_runner_counts_across_processes_and_another_takes_over(fresh_database: Any, tmp_path: Path) -> None:
    dsn = await fresh_database()
    first = await start_app(dsn, tmp_path / "first")
    db = await asyncpg.connect(dsn)
    second: App | None = None
    try:

        async def runners() -> int:
            # This database's runners only: other servers of the test session run theirs elsewhere.
            held: int = await db.fetchval(
                """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                   WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'prefd-statistics'
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
            )
            return held

        await eventually(lambda: _equals(runners(), 1), 10)
        second = await start_app(dsn, tmp_path / "second")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
            stats = statistics_pb2_grpc.StatisticsServiceStub(channel)
            await prefs.SetPreferences(set_request(user("ru1"), {"display.theme": "dark"}), metadata=ADMIN)
            await wait_counted(db, stats)
            assert await runners() == 1  # the second process stands by
            await first.stop(0)
            await prefs.SetPreferences(set_request(user("ru2"), {"display.theme": "dark"}), metadata=ADMIN)
            await eventually(lambda: _equals(runners(), 1), 10)
            await wait_counted(db, stats)
        await init_connection(db)
        expected = await assert_statistics_match_the_database(db)
        assert expected["values"][("display.theme", "", "USER", '"dark"')] == 2
    finally:
        await db.close()
        await first.stop(0)
        if second is not None:
            await second.stop(0)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
