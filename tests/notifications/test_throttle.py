"""Throttles: exact under concurrency across processes, idempotent by key, in Redis when it is up and in
PostgreSQL when it is not configured, unreachable, or stops in the middle of the charges."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from prefd_server.kernel.db import create_pool, migrate
from prefd_server.kernel.redis import RedisLayers
from prefd_server.notifications import throttle_store
from prefd_server.notifications.model import ThrottleRule, ThrottleState
from prefd_server.notifications.throttle import Throttles, window_of
from tests.helpers.auth import unique
from tests.helpers.processes import RedisServer, free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RULE = ThrottleRule(limit=5, window_s=3600)
EVENT = "LARGE_LOSS"
# Where the counters are: Redis up, Redis configured but nothing listening, no Redis at all.
MODES = {"redis": "redis", "redis_down": "postgresql", "no_redis": "postgresql"}


@pytest.fixture(scope="module")
async def database(fresh_database: Any) -> str:
    """A migrated database of its own."""
    url: str = await fresh_database()
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


def redis_url_for(mode: str) -> str | None:
    if mode == "redis":
        return REDIS_URL
    if mode == "redis_down":
        return f"redis://127.0.0.1:{free_port()}/0"
    return None


@contextlib.asynccontextmanager
async def process(database: str, redis_url: str | None, namespace: str) -> AsyncIterator[Throttles]:
    """What one server process holds: its own pool, its own Redis client, its own Throttles."""
    pool = await create_pool(database, 1, 10, 10_000)
    redis = RedisLayers(redis_url, namespace) if redis_url else None
    throttles = Throttles(pool, redis)
    try:
        yield throttles
    finally:
        await throttles.close()
        if redis is not None:
            await redis.close()
        await pool.close()


@contextlib.asynccontextmanager
async def two_processes(database: str, redis_url: str | None) -> AsyncIterator[tuple[Throttles, Throttles]]:
    namespace = unique("throttle-test")
    async with process(database, redis_url, namespace) as a, process(database, redis_url, namespace) as b:
        yield a, b


async def table_count(database: str, user_id: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(count), 0) FROM notification_throttles WHERE user_id = $1", user_id
            )
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", MODES)
async def test_exactly_the_limit_is_allowed_across_two_processes(database: str, mode: str) -> None:
    user, now = unique("u"), datetime.now(UTC)
    _, window_end = window_of(RULE, now)
    async with two_processes(database, redis_url_for(mode)) as (a, b):
        results = await asyncio.gather(
            *(
                process.charge(user, EVENT, RULE, now, f"decide-{i}" if i % 2 else "")
                for i, process in enumerate([a, b] * 100)
            )
        )
        assert sum(allowed for allowed, _ in results) == 5
        assert {state.store for _, state in results} == {MODES[mode]}
        assert sorted(state.remaining for allowed, state in results if allowed) == [0, 1, 2, 3, 4]
        assert {state.remaining for allowed, state in results if not allowed} == {0}
        assert {(state.limit, state.resets_at) for _, state in results} == {(5, window_end)}
        for throttles in (a, b):
            assert await throttles.peek(user, EVENT, RULE, now) == ThrottleState(5, 0, window_end, MODES[mode])
        # The next window starts from nothing.
        allowed, state = await a.charge(user, EVENT, RULE, window_end, "next-window")
        assert allowed and state.remaining == 4 and state.resets_at == window_end + timedelta(hours=1)
    assert await table_count(database, user) == (0 if mode == "redis" else 6)


@pytest.mark.parametrize("mode", MODES)
async def test_a_retried_key_is_charged_once_and_answers_its_first_outcome(database: str, mode: str) -> None:
    user, now = unique("u"), datetime.now(UTC)
    async with two_processes(database, redis_url_for(mode)) as (a, b):
        first = await a.charge(user, EVENT, RULE, now, "retry-1")
        assert first[0] and first[1].remaining == 4
        retries = await asyncio.gather(*(p.charge(user, EVENT, RULE, now, "retry-1") for p in [a, b] * 10))
        assert set(retries) == {first}
        assert (await b.peek(user, EVENT, RULE, now)).remaining == 4

        # Concurrent first attempts with one key: one charge between them.
        racing = await asyncio.gather(*(p.charge(user, EVENT, RULE, now, "retry-2") for p in [a, b] * 10))
        assert len(set(racing)) == 1 and racing[0][0] and racing[0][1].remaining == 3

        for key in ("k3", "k4", "k5"):
            assert (await a.charge(user, EVENT, RULE, now, key))[0]
        denied = await b.charge(user, EVENT, RULE, now, "k6")
        assert not denied[0] and denied[1].remaining == 0
        assert await a.charge(user, EVENT, RULE, now, "k6") == denied
        # The first outcome stands even though the window is full now.
        assert await b.charge(user, EVENT, RULE, now, "retry-1") == first

        # A key is one caller's retry for one user and event type: another user's charge counts.
        other = await a.charge(unique("u"), EVENT, RULE, now, "retry-1")
        assert other[0] and other[1].remaining == 4
        assert (await a.charge(user, "OTHER_EVENT", RULE, now, "retry-1"))[1].remaining == 4
    if mode != "redis":
        assert await table_count(database, user) == 6  # retry-1, retry-2, k3-k5, and OTHER_EVENT's


async def test_redis_stopped_mid_run_sends_the_rest_to_postgresql(database: str) -> None:
    user, now = unique("u"), datetime.now(UTC)
    server = RedisServer(free_port())
    await server.start()
    try:
        async with two_processes(database, server.url) as (a, b):
            before = await asyncio.gather(
                *(p.charge(user, EVENT, RULE, now, f"a{i}") for i, p in enumerate([a, b] * 50))
            )
            assert {state.store for _, state in before} == {"redis"}
            assert sum(allowed for allowed, _ in before) == 5

            during = [
                asyncio.ensure_future(p.charge(user, EVENT, RULE, now, f"b{i}")) for i, p in enumerate([a, b] * 50)
            ]
            await server.stop()
            during_results = await asyncio.gather(*during)  # none of them fails
            after = await asyncio.gather(
                *(p.charge(user, EVENT, RULE, now, f"c{i}") for i, p in enumerate([a, b] * 25))
            )
            assert {state.store for _, state in after} == {"postgresql"}

            results = [*before, *during_results, *after]
            # Each store holds its own exact count; the switch may give one window one more limit.
            assert sum(allowed for allowed, state in results if state.store == "redis") == 5
            assert sum(allowed for allowed, state in results if state.store == "postgresql") == 5
            assert (await a.peek(user, EVENT, RULE, now)).store == "postgresql"
    finally:
        await server.stop()


async def test_limit_zero_is_not_throttled_and_touches_nothing() -> None:
    throttles = Throttles(cast(Any, None), None)  # any I/O would fail on the missing pool
    rule, now = ThrottleRule(limit=0, window_s=3600), datetime.now(UTC)
    assert await throttles.charge("u", EVENT, rule, now, "key") == (True, ThrottleState())
    assert await throttles.peek("u", EVENT, rule, now) == ThrottleState()


def test_windows_are_fixed_and_aligned_to_the_epoch() -> None:
    at = datetime(2031, 3, 4, 12, 34, 56, tzinfo=UTC)
    assert window_of(ThrottleRule(1, 3600), at) == (
        at.replace(minute=0, second=0),
        at.replace(hour=13, minute=0, second=0),
    )
    assert window_of(ThrottleRule(1, 86400), at)[0] == datetime(2031, 3, 4, tzinfo=UTC)
    berlin = at.astimezone(ZoneInfo("Europe/Berlin"))  # the same instant in another zone: the same window
    assert window_of(ThrottleRule(1, 600), berlin) == window_of(ThrottleRule(1, 600), at)


@pytest.mark.parametrize("mode", ["redis", "no_redis"])
async def test_erasure_forgets_the_users_throttles(database: str, mode: str) -> None:
    user, now = unique("u"), datetime.now(UTC)
    async with process(database, redis_url_for(mode), unique("throttle-test")) as throttles:
        for key in ("e1", "e2", ""):
            await throttles.charge(user, EVENT, RULE, now, key)
        assert (await throttles.peek(user, EVENT, RULE, now)).remaining == 2
        conn = await asyncpg.connect(database)
        try:
            deleted = await throttle_store.delete_user_throttles(conn, user)
        finally:
            await conn.close()
        assert deleted == (0 if mode == "redis" else 3)  # one window, two keyed charges
        await throttles.forget(user)
        assert (await throttles.peek(user, EVENT, RULE, now)).remaining == 5
        assert (await throttles.charge(user, EVENT, RULE, now, "e1"))[1].remaining == 4  # the key is gone too


async def test_keys_expire_after_a_day_and_old_rows_are_purged(database: str) -> None:
    user, now = unique("u"), datetime.now(UTC)
    pool = await create_pool(database, 1, 2, 10_000)
    throttles = Throttles(pool, None)
    assert (await throttles.charge(user, EVENT, RULE, now, "old"))[1].remaining == 4
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                """UPDATE notification_throttle_charges SET created_at = now() - interval '25 hours'
                   WHERE user_id = $1""",
                user,
            )
            # An expired key is a new charge.
            assert (await throttles.charge(user, EVENT, RULE, now, "old"))[1].remaining == 3
            await conn.execute(
                """UPDATE notification_throttle_charges SET created_at = now() - interval '25 hours'
                   WHERE user_id = $1""",
                user,
            )
            await conn.execute(
                "UPDATE notification_throttles SET window_end = now() - interval '25 hours' WHERE user_id = $1", user
            )
            assert await throttle_store.purge_expired(pool) >= 2
            assert await conn.fetchval("SELECT count(*) FROM notification_throttles WHERE user_id = $1", user) == 0
            left = await conn.fetchval("SELECT count(*) FROM notification_throttle_charges WHERE user_id = $1", user)
            assert left == 0
    finally:
        await throttles.close()
        await pool.close()
