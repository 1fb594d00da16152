"""The database monitor: probes PostgreSQL on an interval, feeds the pool's breaker and publishes reachability."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from prefd_server.kernel.db import breaker_of
from prefd_server.ops.checks import Probe
from prefd_server.ops.health_store import select_one

log = logging.getLogger(__name__)


class HealthMonitor:
    """Keeps `publish(True)` (grpc.health.v1 SERVING) only while PostgreSQL answers, and the pool's breaker
    open while it does not (calls that need the database then fail at once)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publish: Callable[[bool], Awaitable[None]],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._pool = pool
        self._breaker = breaker_of(pool)
        self._publish = publish
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._probe = Probe(self._select_one)
        self.database_ok = False

    async def check_once(self) -> bool:
        """Probe PostgreSQL once and publish the result."""
        try:
            await self._probe.run(self._timeout_s)
            ok = True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            ok = False
        if ok != self.database_ok:
            log.log(logging.INFO if ok else logging.WARNING, "database %s", "reachable" if ok else "unreachable")
        self.database_ok = ok
        if self._breaker is not None:
            self._breaker.record(ok)
        await self._publish(ok)
        return ok

    async def _select_one(self) -> None:
        await select_one(self._pool)

    async def run(self) -> None:
        """Check every interval until cancelled."""
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)
