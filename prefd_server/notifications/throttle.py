"""Throttles: N sends per window per user and event type, counted where every process and host sees them.

Windows are fixed and aligned to the epoch (window_start = floor(at / window) * window, in UTC
seconds): every process computes the same window from the same `at` without sharing any state, a
window resets all at once (resets_at is the window's end), and a burst straddling a boundary may get
up to twice the limit within one window's length (the price of not keeping a log of every send).

Counters live in Redis (one atomic Lua script per charge: one round trip). When Redis is not
configured, is marked down, or fails during a charge, the charge goes to PostgreSQL instead
(throttle_store): still exact and shared by every process, at the cost of a database round trip
(a few for a charge with an idempotency key). We do not fall back to per-process counters: with
several processes they would multiply the limit by the number of processes, which breaks the promise
a throttle makes, whereas PostgreSQL is there whenever a decision can be made at all. ThrottleState.store
says which store answered, so the decision's trace can say it.

The two stores do not share counts: when Redis goes down (or comes back) mid-window, the other store
starts that window from its own count, so a window spanning a switch may allow up to one limit more
per switch, and a key charged in one store is not known to the other (a retry across a switch is
charged again). A charge whose Redis answer was lost after the script ran is counted in both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime

import asyncpg

from prefd_server.kernel.redis import ChargeOutcome, RedisLayers
from prefd_server.notifications import throttle_store
from prefd_server.notifications.model import ThrottleRule, ThrottleState

log = logging.getLogger(__name__)

# How often (at most) one process purges PostgreSQL throttle rows older than a day, while it charges there.
PURGE_EVERY_S = 600.0


def window_of(rule: ThrottleRule, at: datetime) -> tuple[datetime, datetime]:
    """The (start, end) of the fixed window `at` falls in, aligned to the Unix epoch."""
    start_s = math.floor(at.timestamp() / rule.window_s) * rule.window_s
    return datetime.fromtimestamp(start_s, UTC), datetime.fromtimestamp(start_s + rule.window_s, UTC)


def counter_name(user_id: str, event_type: str) -> str:
    """The Redis counter of a user's event type (user ids never contain '/')."""
    return f"{user_counters_prefix(user_id)}{event_type}"


def user_counters_prefix(user_id: str) -> str:
    """The prefix of every throttle counter and charge of one user in Redis (erasure deletes them all)."""
    return f"throttle:{user_id}/"


def state_of(limit: int, count: int, resets_at: datetime, store: str) -> ThrottleState:
    """The state of a throttle allowing `limit` per window with `count` charges in the window."""
    return ThrottleState(limit, max(limit - count, 0), resets_at, store)


class Throttles:
    """Per user x event type throttles, in Redis when it is up, else in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, redis: RedisLayers | None) -> None:
        self._pool = pool
        self._redis = redis
        self._purged_at = -math.inf  # the first charge in PostgreSQL purges
        self._purges: set[asyncio.Task[None]] = set()

    async def peek(self, user_id: str, event_type: str, rule: ThrottleRule, at: datetime) -> ThrottleState:
        """The throttle's state at `at` without charging it (limit 0: not throttled, no I/O)."""
        if rule.limit <= 0:
            return ThrottleState()
        start, end = window_of(rule, at)
        if self._redis is not None:
            count = await self._redis.peek(counter_name(user_id, event_type), int(start.timestamp()))
            if count is not None:
                return state_of(rule.limit, count, end, "redis")
        count = await throttle_store.count_in(self._pool, user_id, event_type, start)
        return state_of(rule.limit, count, end, "postgresql")

    async def charge(
        self, user_id: str, event_type: str, rule: ThrottleRule, at: datetime, idempotency_key: str = ""
    ) -> tuple[bool, ThrottleState]:
        """Count one send at `at` if the window has room: (allowed, state after the charge).

        A charge repeating the idempotency key of one made in the last 24 h (same user and event type)
        returns that charge's outcome and counts nothing. Limit 0: not throttled (allowed, no I/O)."""
        if rule.limit <= 0:
            return True, ThrottleState()
        start, end = window_of(rule, at)
        outcome: ChargeOutcome | None = None
        if self._redis is not None:
            outcome = await self._redis.charge(
                counter_name(user_id, event_type), int(start.timestamp()), rule.window_s, rule.limit, idempotency_key
            )
        if outcome is not None:
            store = "redis"
        else:
            store = "postgresql"
            outcome = await throttle_store.charge(
                self._pool, user_id, event_type, (start, end), rule.limit, idempotency_key
            )
            self._maybe_purge()
        return outcome.allowed, state_of(outcome.limit, outcome.count, end, store)

    async def forget(self, user_id: str) -> None:
        """Drop the user's throttle counters and charges in Redis (after an erasure; PostgreSQL's rows go
        with throttle_store.delete_user_throttles inside the erasure's transaction)."""
        if self._redis is not None:
            await self._redis.delete_counters(user_counters_prefix(user_id))

    async def close(self) -> None:
        """Wait for a purge in progress."""
        if self._purges:
            await asyncio.gather(*self._purges, return_exceptions=True)

    def _maybe_purge(self) -> None:
        if time.monotonic() - self._purged_at < PURGE_EVERY_S:
            return
        self._purged_at = time.monotonic()
        task = asyncio.ensure_future(self._purge())
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    async def _purge(self) -> None:
        try:
            await throttle_store.purge_expired(self._pool)
        except Exception:  # a failed purge is retried next time; the charge it followed has answered
            log.warning("purging expired notification throttles failed", exc_info=True)
