"""HealthMonitor without a server: it publishes each probe's result and logs only the transitions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from prefd_server.ops.monitor import HealthMonitor


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
