"""Redis client shared by the caches and counters: scope layers as opaque bytes, monotonic counters,
windowed counters charged atomically (throttles), and availability tracking so a failing Redis is
skipped for a while instead of failing requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prefd_server.kernel.model import Scope
from prefd_server.kernel.redis_wire import RedisWire

log = logging.getLogger(__name__)

# Raise a counter to ARGV[1] (never lower it), with a TTL of ARGV[2] seconds.
_RAISE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 1
"""

# Charge windowed counters, each once per idempotency key, in order (one script: one round trip for
# a batch of charges, each seeing the ones before it). ARGV[1]: how long an outcome is kept (s); then
# per charge: "1" when it has an idempotency key (else "0"), its limit and its counter's TTL (s).
# KEYS per charge: the window's counter, then (only with a key) the outcome recorded for the key.
# A recorded outcome is returned unchanged; otherwise the counter is raised while below the limit and
# the outcome ("allowed:count:limit") is recorded. Returns allowed, count, limit per charge, flat.
_CHARGE_SCRIPT = """
local out = {}
local k = 1
for a = 2, #ARGV, 3 do
  local counter = KEYS[k]
  k = k + 1
  local seen_key = nil
  if ARGV[a] == '1' then
    seen_key = KEYS[k]
    k = k + 1
  end
  local limit = tonumber(ARGV[a + 1])
  local seen = seen_key and redis.call('GET', seen_key)
  if seen then
    local allowed, count, charged = string.match(seen, '^(%d+):(%d+):(%d+)$')
    out[#out + 1] = tonumber(allowed)
    out[#out + 1] = tonumber(count)
    out[#out + 1] = tonumber(charged)
  else
    local count = tonumber(redis.call('GET', counter) or '0')
    local allowed = 0
    if count < limit then
      count = redis.call('INCR', counter)
      if count == 1 then redis.call('EXPIRE', counter, ARGV[a + 2]) end
      allowed = 1
    end
    if seen_key then redis.call('SET', seen_key, allowed .. ':' .. count .. ':' .. limit, 'EX', ARGV[1]) end
    out[#out + 1] = allowed
    out[#out + 1] = count
    out[#out + 1] = limit
  end
end
return out
"""
# How long a charge's outcome answers retries with the same idempotency key.
CHARGE_MEMORY_S = 24 * 3600
# A window's counter outlives the window's end by this much (clock skew between hosts).
WINDOW_GRACE_S = 60


# Charges queued while a round trip is being prepared go in one script call, at most this many.
MAX_CHARGES_PER_ROUND_TRIP = 512

# A charge waiting for its round trip: its keys, (limit, counter TTL), and its caller's answer.
_QueuedCharge = tuple[list[str], tuple[int, int], "asyncio.Future[ChargeOutcome | None]"]


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    """What charging a windowed counter did: allowed (the counter was raised), its count after the
    charge (at the time of the first charge, for a retried key), and the limit it was charged against."""

    allowed: bool
    count: int
    limit: int


class RedisLayers:
    """L2: encoded scope layers in Redis with a TTL, plus counters; a failing Redis is skipped for a while."""

    def __init__(self, url: str, namespace: str, ttl_s: int = 60, retry_after_s: float = 1.0) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._prefix = f"prefd:{namespace}:layer:"
        self._counter_prefix = f"prefd:{namespace}:counter:"
        self._ttl_s = ttl_s
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self.errors = 0
        self.last_error = ""
        self._charges: list[_QueuedCharge] = []
        self._charge_script = self._client.register_script(_CHARGE_SCRIPT)
        # Charges are on the decision path: they go over one pipelined connection (redis-py for TLS).
        pool = self._client.connection_pool
        plain = pool.connection_class in (aioredis.Connection, aioredis.UnixDomainSocketConnection)
        self._wire = RedisWire(pool.connection_kwargs, timeout_s=0.5) if plain else None
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def available(self) -> bool:
        """False while Redis is considered down (after a failure, until the retry time)."""
        return time.monotonic() >= self._down_until

    def _key(self, scope: Scope) -> str:
        return f"{self._prefix}{scope.kind.value}:{scope.id}"

    def _failed(self, exc: Exception) -> None:
        if self.available:
            log.warning("redis unavailable, serving from PostgreSQL and memory: %s", exc)
        self.errors += 1
        self.last_error = str(exc)
        self._down_until = time.monotonic() + self._retry_after_s

    def _recovered(self) -> None:
        if self.last_error:
            log.info("redis available again")
            self.last_error = ""

    async def ping(self) -> bool:
        """Probe Redis (also while marked down) and update availability."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._down_until = 0.0
        self._recovered()
        return True

    async def get_many(self, scopes: Sequence[Scope]) -> dict[Scope, bytes | str]:
        """The stored layer of each scope that has one (nothing while Redis is unavailable)."""
        if not self.available or not scopes:
            return {}
        try:
            raw = await self._client.mget([self._key(s) for s in scopes])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return {}
        self._recovered()
        return {scope: blob for scope, blob in zip(scopes, raw, strict=True) if blob is not None}

    async def set_many(self, layers: dict[Scope, bytes]) -> None:
        """Store each scope's encoded layer with the TTL."""
        if not self.available or not layers:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for scope, blob in layers.items():
                    pipe.set(self._key(scope), blob, ex=self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def delete(self, scopes: Iterable[Scope]) -> None:
        """Forget the stored layers of `scopes`."""
        keys = [self._key(s) for s in scopes]
        if not keys or not self.available:
            return
        try:
            await self._client.delete(*keys)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def raise_counters(self, values: dict[str, int], ttl_s: int) -> bool:
        """Set each counter to its value unless it already holds a larger one (totals only grow).

        False if Redis could not be updated."""
        if not values:
            return True
        if not self.available:
            return False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, value in values.items():
                    pipe.eval(_RAISE_SCRIPT, 1, f"{self._counter_prefix}{name}", value, ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        return True

    async def counters(self, names: Sequence[str]) -> dict[str, int] | None:
        """The counters that exist (None while Redis is unavailable)."""
        if not self.available:
            return None
        try:
            raw = await self._client.mget([f"{self._counter_prefix}{n}" for n in names])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._recovered()
        return {name: int(value) for name, value in zip(names, raw, strict=True) if value is not None}

    async def delete_counters(self, prefix: str) -> None:
        """Delete every counter whose name starts with `prefix`."""
        if not self.available:
            return
        try:
            names = [n async for n in self._client.scan_iter(match=f"{self._counter_prefix}{prefix}*", count=500)]
            if names:
                await self._client.delete(*names)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    def _window_key(self, counter: str, window_start: int) -> str:
        return f"{self._counter_prefix}{counter}@{window_start}"

    async def charge(
        self, counter: str, window_start: int, window_s: int, limit: int, idempotency_key: str = ""
    ) -> ChargeOutcome | None:
        """Count one use of `counter` in the window starting at `window_start` (epoch seconds, `window_s`
        long) if it is below `limit`, atomically and in one round trip (a Lua script).

        With an idempotency key, the first charge's outcome is kept for 24 h and a charge with the same
        key (for the same counter) returns it unchanged, counting nothing. Windows are whatever the
        caller aligns them to; the counter expires a minute after its window ends. None while Redis is
        unavailable or when the script fails (the charge may or may not have been counted then)."""
        if not self.available:
            return None
        window_end = window_start + window_s
        counter_ttl_s = max(window_end - int(time.time()), window_s) + WINDOW_GRACE_S
        keys = [self._window_key(counter, window_start)]
        if idempotency_key:
            keys.append(f"{self._counter_prefix}{counter}#{idempotency_key}")
        answer: asyncio.Future[ChargeOutcome | None] = asyncio.get_running_loop().create_future()
        self._charges.append((keys, (limit, counter_ttl_s), answer))
        if len(self._charges) == 1:
            self._spawn(self._send_charges())
        return await answer

    async def _send_charges(self) -> None:
        """Send the charges queued so far in one script call (each call's charge joins the next batch: one
        round trip for all, each charge atomic, in queue order) and answer every caller."""
        batch, self._charges = self._charges[:MAX_CHARGES_PER_ROUND_TRIP], self._charges[MAX_CHARGES_PER_ROUND_TRIP:]
        if self._charges:
            self._spawn(self._send_charges())
        keys: list[str] = []
        args: list[int | str] = [CHARGE_MEMORY_S]
        for charge_keys, (limit, counter_ttl_s), _ in batch:
            keys += charge_keys
            args += ["1" if len(charge_keys) > 1 else "0", limit, counter_ttl_s]
        try:
            flat = await self._run_charge_script(keys, args)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            _answer_charges(batch, None)
            return
        except BaseException:  # cancelled at shutdown: the callers fall back to PostgreSQL
            _answer_charges(batch, None)
            raise
        self._recovered()
        _answer_charges(batch, [int(v) for v in flat])

    async def _run_charge_script(self, keys: list[str], args: list[int | str]) -> list[Any]:
        """The charge script's reply: over the pipelined connection when there is one (loading the script
        into Redis the first time, or after a restart forgot it), else through redis-py."""
        if self._wire is None:
            return list(await self._charge_script(keys=keys, args=args))
        sha = self._charge_script.sha
        reply = await self._wire.call("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            await self._wire.call("SCRIPT", "LOAD", _CHARGE_SCRIPT)
            reply = await self._wire.call("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return list(reply)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def peek(self, counter: str, window_start: int) -> int | None:
        """How often `counter` was charged in the window starting at `window_start` (None while Redis
        is unavailable)."""
        if not self.available:
            return None
        try:
            raw = await self._client.get(self._window_key(counter, window_start))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._recovered()
        return int(raw) if raw is not None else 0

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._wire is not None:
            self._wire.close()
        await self._client.aclose()


def _answer_charges(batch: Sequence[_QueuedCharge], flat: Sequence[int] | None) -> None:
    """Each waiting caller's outcome from the script's flat reply; None for all when the call failed (the
    charges may or may not have been counted then)."""
    for n, (_, _, answer) in enumerate(batch):
        if answer.done():  # its caller was cancelled
            continue
        if flat is None:
            answer.set_result(None)
        else:
            allowed, count, limit = flat[3 * n : 3 * n + 3]
            answer.set_result(ChargeOutcome(bool(allowed), count, limit))
