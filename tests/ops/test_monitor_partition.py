"""HealthMonitor across a partition that leaves its probe's connection hanging for good: once PostgreSQL is
back, the monitor finds it within an interval and a timeout, on a fresh connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import asyncpg
import pytest

from prefd_server.kernel.db import breaker_of, create_pool
from prefd_server.ops.monitor import HealthMonitor
from tests.helpers.netns import StallingRelay, stalling_relay

INTERVAL_S = 0.1
TIMEOUT_S = 0.3
SLACK_S = 0.5


@pytest.fixture
async def relay(server_url: str) -> AsyncIterator[StallingRelay]:
    async with stalling_relay(server_url) as relay:
        yield relay


@pytest.fixture
async def pool(relay: StallingRelay, fresh_database: Any) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database through the relay, terminated after the test."""
    database = urlparse(await fresh_database()).path.lstrip("/")
    pool = await create_pool(relay.url(database), 2, 4, 10_000)
    try:
        yield pool
    finally:
        pool.terminate()


class Published:
    """What the monitor published, and a wait for the next value it publishes."""

    def __init__(self) -> None:
        self.values: list[bool] = []
        self.changed = asyncio.Condition()

    async def publish(self, serving: bool) -> None:
        async with self.changed:
            self.values.append(serving)
            self.changed.notify_all()

    async def until(self, serving: bool, deadline_s: float) -> float:
        """Seconds until the monitor publishes `serving`."""
        started, seen = time.monotonic(), len(self.values)
        async with asyncio.timeout(deadline_s), self.changed:
            await self.changed.wait_for(lambda: serving in self.values[seen:])
        return time.monotonic() - started


async def test_the_monitor_finds_the_database_back_on_a_fresh_connection(
    relay: StallingRelay, pool: asyncpg.Pool
) -> None:
    published = Published()
    monitor = HealthMonitor(pool, published.publish, INTERVAL_S, TIMEOUT_S)
    running = asyncio.create_task(monitor.run())
    try:
        await published.until(True, 5)
        relay.cut()
        await published.until(False, INTERVAL_S + TIMEOUT_S + SLACK_S)
        breaker = breaker_of(pool)
        assert breaker is not None and breaker.is_open
        # The probe that found it down still waits on a connection that will never answer again.
        relay.heal()
        back_after = await published.until(True, 5)
        assert back_after < INTERVAL_S + TIMEOUT_S + SLACK_S, back_after
        assert not breaker.is_open
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_recheck_gives_up_on_the_hung_probe_and_publishes_at_once(
    relay: StallingRelay, pool: asyncpg.Pool
) -> None:
    published = Published()
    # Probes every hour: only check_once() and recheck() probe here.
    monitor = HealthMonitor(pool, published.publish, interval_s=3600, timeout_s=TIMEOUT_S)
    assert await monitor.check_once() is True
    relay.cut()
    assert await monitor.check_once() is False  # its check hangs on a connection the cut left hanging
    relay.heal()
    # Something else reached PostgreSQL: the re-check does not wait on the hung check, it probes afresh.
    started = time.monotonic()
    assert await monitor.recheck() is True
    assert time.monotonic() - started < TIMEOUT_S
    assert published.values == [True, False, True]
    assert await monitor.recheck() is True  # reachable already: nothing more is published
    assert published.values == [True, False, True]
