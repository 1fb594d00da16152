"""HealthMonitor and its Probe: each probe's result published, transitions logged, a stalled event loop
not taken for a silent database, and a fully busy pool not taken for one either."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefd_server.app import App
from prefd_server.kernel.db import breaker_of
from prefd_server.ops.checks import Probe
from prefd_server.ops.monitor import HealthMonitor
from tests.helpers.health import NOT_SERVING, SERVING, next_status
from tests.helpers.settings import make_settings


class _Connection:
    def __init__(self) -> None:
        self.down = False

    async def fetchval(self, query: str) -> int:
        if self.down:
            raise OSError("connection refused")
        return 1


class _Pool:
    """Just enough of asyncpg.Pool for the probe: one connection that answers or refuses."""

    def __init__(self) -> None:
        self.connection = _Connection()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Connection]:
        yield self.connection


async def test_each_check_is_published_and_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefd_server.ops.monitor")
    pool = _Pool()
    published: list[bool] = []

    async def publish(serving: bool) -> None:
        published.append(serving)

    pool_any: Any = pool
    monitor = HealthMonitor(pool_any, publish, interval_s=3600, timeout_s=5)
    assert await monitor.check_once() is True
    assert await monitor.check_once() is True
    pool.connection.down = True
    assert await monitor.check_once() is False
    assert monitor.database_ok is False
    pool.connection.down = False
    assert await monitor.check_once() is True
    assert published == [True, True, False, True]
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "prefd_server.ops.monitor"] == [
        (logging.INFO, "database reachable"),
        (logging.WARNING, "database unreachable"),
        (logging.INFO, "database reachable"),
    ]


async def test_an_answer_that_came_while_the_event_loop_stalled_is_not_a_timeout() -> None:
    """A process pause longer than the timeout (the loop runs nothing) with the answer already in: the
    check is given the turns it needs to finish rather than counted as unanswered."""
    loop = asyncio.get_running_loop()

    async def check() -> int:
        answered = loop.create_future()
        loop.call_later(0.05, answered.set_result, None)
        await answered
        await asyncio.sleep(0)  # one more step after the answer, as a driver's read takes
        return 1

    probe = Probe(check)
    loop.call_later(0.01, time.sleep, 0.3)  # the whole loop stalls past the answer and the timeout
    assert await probe.run(0.1) == 1


async def test_a_check_with_no_answer_still_times_out() -> None:
    async def check() -> int:
        await asyncio.Event().wait()
        return 1

    probe = Probe(check)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await probe.run(0.1)
    assert time.monotonic() - started < 0.5
    probe.abandon()


async def test_the_monitor_keeps_serving_while_calls_hold_every_pooled_connection(
    database_url: str, tmp_path: Path
) -> None:
    """The monitor probes on a connection of its own: a pool that calls keep fully busy is load, not
    PostgreSQL being down, and the breaker stays closed."""
    settings = make_settings(database_url, tmp_path, db_pool_min=1, db_pool_max=2, health_interval_s=0.05)
    async with App(settings) as app:
        assert app.kernel is not None
        pool = app.kernel.pool
        breaker = breaker_of(pool)
        assert breaker is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stream = health.Watch(health_pb2.HealthCheckRequest(service="prefd.v1.PreferencesService"))
            assert await next_status(stream, SERVING, 5) >= 0
            held = [await pool.acquire() for _ in range(settings.db_pool_max)]
            try:
                # Longer than several probes with their timeouts: none may find the database down.
                with pytest.raises(TimeoutError):
                    await next_status(stream, NOT_SERVING, 3 * (settings.health_interval_s + settings.health_timeout_s))
                assert not breaker.is_open
            finally:
                for conn in held:
                    await pool.release(conn)
            stream.cancel()
