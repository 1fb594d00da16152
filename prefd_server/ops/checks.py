"""Component checks behind GetSystemHealth, each bounded by its own timeout."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg

from prefd_server.kernel.deadline import outside_call
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.redis import RedisLayers
from prefd_server.ops.health_store import oldest_write_transaction_ms, select_one
from prefd_server.ops.model import ComponentReport, Status, SystemReport

T = TypeVar("T")

# Event-loop turns a timed-out check is given to read an answer that arrived while the loop stalled
# (socket readable, then the driver's callback, then the check's own step).
STALL_TURNS = 4

# The connections the running check of a Probe holds through a ProbedPool (set in the check's context).
_held: contextvars.ContextVar[set[Any] | None] = contextvars.ContextVar("prefd_probe_held", default=None)


class ProbedPool:
    """A pool as a Probe's check uses it: the pool's acquire(), and while the check holds the connection
    its Probe knows it, so that giving up on the check terminates it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._pool.acquire() as conn:
            held = _held.get()
            if held is not None:
                held.add(conn)
            try:
                yield conn
            finally:
                if held is not None:
                    held.discard(conn)


class Probe(Generic[T]):
    """A dependency check bounded by a timeout that never waits for a hung check to unwind.

    asyncio.timeout would wait for the cancelled check's cleanup, and against a hung server that
    cleanup (asyncpg cancelling the query over a new connection, releasing it to the pool) hangs
    too. Instead a check still running when its caller gives up is left running, and a call within
    `abandon_after_s` of its start waits on it again rather than starting another, so hung checks never
    pile up. A later call gives up on it (abandon()) and starts afresh: after a network partition the
    connection it hangs on answers only at TCP's next retransmission, which backs off with the outage.
    """

    def __init__(self, check: Callable[[], Awaitable[T]], abandon_after_s: float = 10.0) -> None:
        self._check = check
        self._abandon_after_s = abandon_after_s
        self._task: asyncio.Future[T] | None = None
        self._held: set[Any] = set()
        self._started = 0.0

    async def run(self, timeout_s: float) -> T:
        """The check's result if it comes within `timeout_s`, else TimeoutError at once."""
        task = self._task
        now = time.monotonic()
        if task is not None and not task.done() and now - self._started > self._abandon_after_s:
            self.abandon()
        if self._task is None or self._task.done():
            # Outside the asking call's budget: the check is shared, and bounds itself.
            context = outside_call()
            self._held = set()
            context.run(_held.set, self._held)
            self._task = asyncio.get_running_loop().create_task(self._checked(), context=context)
            self._task.add_done_callback(_retrieve)
            self._started = now
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            # An event loop that stalled past the timeout (a long pause of the process) may hold the answer
            # unread: a few more turns read it before the check counts as unanswered.
            for _ in range(STALL_TURNS):
                await asyncio.sleep(0)
                if task.done():
                    break
            else:
                raise TimeoutError
        if self._task is task:
            self._task = None
        if task.cancelled():
            raise TimeoutError  # given up on (abandon()) while this call waited for it
        return task.result()

    def abandon(self) -> None:
        """Give up on the running check, if any: terminate the connections it holds through a ProbedPool
        (it then fails at once, and the pool opens a fresh one next time), or cancel it while it holds
        none (still connecting). The next run starts another."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if self._held:
            for conn in list(self._held):
                conn.terminate()
        else:
            task.cancel()

    async def _checked(self) -> T:
        return await self._check()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a failure nobody waited for any more is not news


class HealthChecker:
    """Runs the checks concurrently; a hung dependency costs at most its timeout."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisLayers | None,
        feed: FeedReader,
        timeout_s: float,
        feed_degraded_after_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._probed_pool = ProbedPool(pool)
        self._redis = redis
        self._feed = feed
        self._timeout_s = timeout_s
        self._feed_degraded_after_s = feed_degraded_after_s
        self._started = time.monotonic()
        # A check still running twice its timeout after it began is given up on by the next report.
        self._probes = {
            name: Probe(check, abandon_after_s=2 * timeout_s)
            for name, check in (
                ("postgresql", self._check_postgresql),
                ("redis", self._check_redis),
                ("change_feed", self._check_feed),
            )
        }

    async def report(self) -> SystemReport:
        """Every component's check, run concurrently, and the state they roll up to."""
        components = list(
            await asyncio.gather(
                self._timed("postgresql", True),
                self._timed("redis", False),
                self._timed("change_feed", False),
            )
        )
        if any(c.critical and c.status is not Status.HEALTHY for c in components):
            overall = Status.UNHEALTHY
        elif any(c.status is not Status.HEALTHY for c in components):
            overall = Status.DEGRADED
        else:
            overall = Status.HEALTHY
        return SystemReport(overall, components, time.monotonic() - self._started)

    async def _timed(self, name: str, critical: bool) -> ComponentReport:
        bad = Status.UNHEALTHY if critical else Status.DEGRADED
        start = time.monotonic()
        try:
            status, shared = await self._probes[name].run(self._timeout_s)
            details = dict(shared)  # concurrent reports may share one check's result
            error = "" if status is Status.HEALTHY else details.pop("error", "")
        except TimeoutError:
            status, details, error = bad, {}, f"no answer within {self._timeout_s:.1f} s"
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            status, details, error = bad, {}, f"{type(exc).__name__}: {exc}"
        return ComponentReport(name, status, critical, time.monotonic() - start, error, details)

    async def _check_postgresql(self) -> tuple[Status, dict[str, str]]:
        await select_one(self._probed_pool)
        return Status.HEALTHY, {"pool_size": str(self._pool.get_size()), "pool_idle": str(self._pool.get_idle_size())}

    async def _check_redis(self) -> tuple[Status, dict[str, str]]:
        if self._redis is None:
            return Status.HEALTHY, {"configured": "false", "cache": "in-process only"}
        if await self._redis.ping():
            return Status.HEALTHY, {"configured": "true", "errors": str(self._redis.errors)}
        return Status.DEGRADED, {
            "configured": "true",
            "errors": str(self._redis.errors),
            "error": self._redis.last_error or "unreachable",
        }

    async def _check_feed(self) -> tuple[Status, dict[str, str]]:
        oldest_ms = await oldest_write_transaction_ms(self._probed_pool)
        since_read_s = time.monotonic() - self._feed.last_read_monotonic
        details = {
            "lag_ms": f"{self._feed.lag_ms:.1f}",
            "since_last_read_ms": f"{since_read_s * 1000:.0f}",
            "oldest_transaction_age_ms": str(oldest_ms),
            "watchers": str(self._feed.watchers),
            "process_id": str(os.getpid()),
        }
        if not self._feed.healthy or since_read_s > self._feed_degraded_after_s:
            details["error"] = "the feed reader is not keeping up with the change table"
            return Status.DEGRADED, details
        if oldest_ms > self._feed_degraded_after_s * 1000:
            details["error"] = f"a transaction open for {oldest_ms} ms holds the feed horizon"
            return Status.DEGRADED, details
        return Status.HEALTHY, details
