"""The database monitor: probes PostgreSQL on an interval, feeds the pool's breaker and publishes reachability."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from prefd_server.kernel.db import breaker_of
from prefd_server.ops.checks import Probe, ProbedPool
from prefd_server.ops.health_store import select_one

log = logging.getLogger(__name__)


class HealthMonitor:
    """Keeps `publish(True)` (grpc.health.v1 SERVING) only while PostgreSQL answers, and the pool's breaker
    open while it does not (calls that need the database then fail at once).

    A check still running when the next probe comes round (its timeout and an interval after it began) is
    given up on and its connection terminated, and the probe runs on a fresh one: after a partition the
    old one answers only at TCP's next retransmission, seconds after the database is back."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publish: Callable[[bool], Awaitable[None]],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._pool = ProbedPool(pool)
        self._breaker = breaker_of(pool)
        self._publish = publish
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._probe = Probe(self._select_one, abandon_after_s=timeout_s)
        self._checking = asyncio.Lock()  # one check at a time publishes, in order
        self.database_ok = False

    async def check_once(self) -> bool:
        """Probe PostgreSQL once and publish the result."""
        async with self._checking:
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

    async def recheck(self) -> bool:
        """PostgreSQL has just answered elsewhere (the feed reader) while this monitor finds it down: probe
        again now rather than at the next interval, giving up on a check hung since the outage. Whether
        it is reachable."""
        if self.database_ok:
            return True
        self._probe.abandon()
        return await self.check_once()

    async def _select_one(self) -> None:
        await select_one(self._pool)

    async def run(self) -> None:
        """Check every interval until cancelled."""
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)
