"""Connection pool, migrations and translation of database failures into domain errors."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from types import TracebackType
from typing import Any

import asyncpg

from prefd_server.kernel.deadline import CallDeadlineExceeded, DatabaseBreaker, visit_deadline
from prefd_server.kernel.errors import ConcurrentModification, DatabaseError, DatabaseUnavailable, PrefdError
from prefd_server.kernel.model import Scope

log = logging.getLogger(__name__)

# pg_advisory_lock key that serialises migrations across replicas ("prefd" in ASCII).
MIGRATION_LOCK_KEY = 0x7072656664

Connection = asyncpg.Connection
Pool = asyncpg.Pool


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# A connection whose visit outlived its deadline is terminated this long after it, unless it came
# back first: enough for asyncpg to cancel a query on a live server, and no wait on a hung one.
EXPIRY_GRACE_S = 0.25
# Bound on returning a connection that arrived after its caller gave up.
ABANDONED_RELEASE_TIMEOUT_S = 5.0
# gRPC itself ends a call when its client's deadline passes; a wait for a connection lasts this much
# longer so that gRPC, not an answer sent into a call it is ending, settles the tie.
DEADLINE_TIE_S = 0.02


class GuardedPool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg is untyped (mypy skips it)
    """An asyncpg pool whose acquire() honours the RPC being handled (server.deadline): it fails at
    once while the breaker is open, waits for a connection no longer than the call's deadline, and
    terminates a connection still held past it, so no call outlives its deadline on a hung server.
    Outside any call it is a plain asyncpg pool."""

    __slots__ = ("_abandoned", "breaker")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.breaker = DatabaseBreaker()
        self._abandoned: set[asyncio.Task[Any]] = set()

    def acquire(self, *, timeout: float | None = None) -> Any:
        deadline = visit_deadline()
        if deadline is None:
            return super().acquire(timeout=timeout)
        if timeout is not None:
            deadline = min(deadline, time.monotonic() + timeout)
        return _Visit(self, deadline)

    async def _checkout(self) -> Any:
        return await super().acquire()

    def _abandon(self, checkout: asyncio.Task[Any]) -> None:
        """Give up on a checkout without waiting for it (asyncpg's cleanup of a half-made connection
        can hang with the server); a connection it still yields goes back to the pool."""
        checkout.cancel()
        self._abandoned.add(checkout)
        checkout.add_done_callback(self._checked_out_late)

    def _checked_out_late(self, checkout: asyncio.Task[Any]) -> None:
        self._abandoned.discard(checkout)
        if checkout.cancelled() or checkout.exception() is not None:
            return
        release = asyncio.ensure_future(self.release(checkout.result(), timeout=ABANDONED_RELEASE_TIMEOUT_S))
        self._abandoned.add(release)
        release.add_done_callback(self._released_late)

    def _released_late(self, release: asyncio.Future[Any]) -> None:
        self._abandoned.discard(release)
        if not release.cancelled() and release.exception() is not None:
            log.debug("returning an abandoned connection failed: %r", release.exception())


class _Visit:
    """One `async with pool.acquire()` inside an RPC, bounded by `deadline` (monotonic)."""

    __slots__ = ("_connection", "_deadline", "_expired", "_pool", "_timer")

    def __init__(self, pool: GuardedPool, deadline: float) -> None:
        self._pool = pool
        self._deadline = deadline
        self._connection: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> Any:
        self._pool.breaker.check()
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise CallDeadlineExceeded("the call's deadline passed before it reached the database")
        if self._pool.get_idle_size():
            # An open connection is free: the pool hands it over without a word to the server.
            self._connection = await self._pool._checkout()
        else:
            self._connection = await self._wait_for_connection(remaining)
        delay = self._deadline - time.monotonic() + EXPIRY_GRACE_S
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
        return self._connection

    async def _wait_for_connection(self, remaining: float) -> Any:
        """A connection within `remaining` seconds. The checkout (which may open a connection) runs as
        its own task so that giving up on it never waits for its cleanup."""
        checkout = asyncio.ensure_future(self._pool._checkout())
        try:
            done, _ = await asyncio.wait((checkout,), timeout=remaining + DEADLINE_TIE_S)
        except BaseException:
            self._pool._abandon(checkout)
            raise
        if not done:
            self._pool._abandon(checkout)
            raise CallDeadlineExceeded("no database connection became free within the call's deadline")
        return checkout.result()

    def _expire(self) -> None:
        """The visit outlived its deadline: drop the connection, which ends every wait on it at once
        (the pool makes a new one when it needs one)."""
        self._expired = True
        log.warning("terminating a database connection held past its call's deadline")
        self._connection.terminate()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._pool.release(self._connection)
        except Exception:
            if exc is None and not self._expired:
                raise
            # The visit failed or expired already; that is the story, not its cleanup.
        finally:
            if self._timer is not None:
                self._timer.cancel()
        if self._expired and isinstance(exc, Exception) and not isinstance(exc, PrefdError):
            raise CallDeadlineExceeded("the database did not answer within the call's deadline") from exc


def breaker_of(pool: asyncpg.Pool) -> DatabaseBreaker | None:
    """The breaker a pool made by create_pool() consults, if any."""
    return pool.breaker if isinstance(pool, GuardedPool) else None


# How often terminated_if() asks whether to give up on its connection.
GIVE_UP_TICK_S = 0.05


@contextmanager
def terminated_if(
    conn: asyncpg.Connection, give_up: Callable[[], bool] | None, after_s: float | None = None
) -> Iterator[None]:
    """Terminate `conn` if the block is still running `after_s` seconds on, or once `give_up()` holds
    (asked every GIVE_UP_TICK_S): whatever waits on it fails at once (ConnectionDoesNotExistError) and
    its pool opens a fresh one for the next user. For work outside any call, which no deadline bounds:
    a connection a network partition left hanging answers again only at TCP's next retransmission,
    and those back off with the length of the outage, so it would outlast the outage by seconds."""
    if give_up is None and after_s is None:
        yield
        return
    loop = asyncio.get_running_loop()
    until = math.inf if after_s is None else loop.time() + after_s
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        if loop.time() >= until or (give_up is not None and give_up()):
            log.debug("terminating a database connection given up on")
            conn.terminate()
        else:
            timer = loop.call_later(min(GIVE_UP_TICK_S, until - loop.time()), check)

    check()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset on release: for a pool whose connections only ever run single read-only statements."""


async def create_pool(
    dsn: str,
    min_size: int,
    max_size: int,
    statement_timeout_ms: int,
    *,
    single_statements: bool = False,
    breaker: DatabaseBreaker | None = None,
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python values and whose acquire() honours the
    deadline of the RPC being handled (GuardedPool). `single_statements`: its users only run single
    read-only statements (no session state), so a release skips asyncpg's reset round trip. `breaker`:
    share another pool's breaker (open while the database is known down)."""
    pool = GuardedPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        init=init_connection,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        server_settings={"statement_timeout": str(statement_timeout_ms), "application_name": "prefd"},
        command_timeout=max(statement_timeout_ms / 1000 + 5, 10) if statement_timeout_ms else None,
        reset=_keep_session if single_statements else None,
    )
    if breaker is not None:
        pool.breaker = breaker
    await pool
    return pool


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One process's connection pool at a moment."""

    size: int
    in_use: int
    idle: int
    waiting: int
    min_size: int
    max_size: int


def pool_stats(pool: asyncpg.Pool) -> PoolStats:
    """The pool's figures. asyncpg has no public count of callers waiting in acquire(); it is the
    number of waiters on the pool's connection queue (an asyncio.Queue), read defensively."""
    size, idle = pool.get_size(), pool.get_idle_size()
    getters = getattr(getattr(pool, "_queue", None), "_getters", ())
    waiting = sum(1 for waiter in getters if not waiter.done())
    return PoolStats(size, size - idle, idle, waiting, pool.get_min_size(), pool.get_max_size())


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every bundled migration, in order."""
    found = []
    for entry in resources.files("prefd_server.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations under an advisory lock; returns the names applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration", extra={"migration": name})
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Turn asyncpg and connection failures into domain errors (never UNKNOWN)."""
    try:
        yield
    except PrefdError:
        raise
    except (
        OSError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.InterfaceError,
        TimeoutError,
    ) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError) as exc:
        raise ConcurrentModification("concurrent update; retry") from exc
    except asyncpg.PostgresError as exc:
        log.exception("database error")
        raise DatabaseError(f"database error {exc.sqlstate}") from exc


async def horizon_xid(conn: asyncpg.Connection) -> int:
    """xmin of a fresh snapshot: every transaction with a smaller xid has finished."""
    value: int = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    return value


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A connection inside a REPEATABLE READ read-only transaction, and that snapshot's feed horizon."""

    conn: asyncpg.Connection
    xmin: int


@asynccontextmanager
async def snapshot(pool: asyncpg.Pool, give_up: Callable[[], bool] | None = None) -> AsyncIterator[Snapshot]:
    """Read everything inside at one moment: one REPEATABLE READ transaction and its horizon (xmin).

    Every change below xmin is visible to the reads; watching the feed from xmin misses none after.
    `give_up`: its connection is terminated once this holds (terminated_if), failing the reads at once.
    """
    async with translated_errors(), pool.acquire() as conn:
        with terminated_if(conn, give_up):
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield Snapshot(conn, await horizon_xid(conn))


async def installation_identity(pool: asyncpg.Pool) -> tuple[str, str]:
    """(installation id, pseudonym key): what binds cursors and tokens to this database, and the
    secret every replica derives its token key and users' pseudonyms from."""
    async with translated_errors(), pool.acquire() as conn:
        row = await conn.fetchrow("SELECT id, pseudonym_key FROM installation")
    return row["id"], row["pseudonym_key"]


async def lock_scope(conn: asyncpg.Connection, scope: Scope) -> datetime:
    """Serialise writers of one scope (preferences, consents, erasure) until the transaction ends.

    Returns the transaction's timestamp (`now()`), which every row it writes is stamped with, so a
    write can answer the times later reads return without another round trip.
    """
    written_at: datetime = await conn.fetchval(
        "SELECT now() FROM pg_advisory_xact_lock(hashtextextended($1, 0))", f"prefd:{scope.kind}:{scope.id}"
    )
    return written_at
