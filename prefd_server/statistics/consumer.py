"""The statistics consumer: applies the change feed's batches exactly once (deltas and position in one
transaction), run by one runner across processes (a PostgreSQL advisory lock), woken by the feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import init_connection
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, ScopeKind
from prefd_server.kernel.parts import KeyCatalog
from prefd_server.statistics import store
from prefd_server.statistics.model import BatchOutcome
from prefd_server.statistics.rules import Plan, Planner, erased_scopes, touched_slots, writes_of

log = logging.getLogger(__name__)

BATCH = 5000
STATEMENT_TIMEOUT_S = 120.0
_COUNTED_KINDS = frozenset({ChangeKind.PREFERENCE, ChangeKind.ERASURE})
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def sensitivity(catalog: KeyCatalog, keys: Sequence[str]) -> dict[str, bool]:
    """Whether each key's values are kept out of the statistics (sensitive, or no longer defined)."""
    found = {}
    for key in keys:
        facts = await catalog.key_facts(key)
        found[key] = True if facts is None else facts.sensitive
    return found


async def apply_batch(conn: asyncpg.Connection, catalog: KeyCatalog, limit: int = BATCH) -> tuple[BatchOutcome, bool]:
    """Count the next batch of changes after the stored position and store the new position, all in one
    transaction; (what it did, whether more changes may be waiting)."""
    async with conn.transaction():
        position, horizon = await store.lock_apply(conn)
        rows = await store.read_changes(conn, position, horizon, limit)
        outcome = BatchOutcome(events=len(rows))
        if not rows:  # an idle poll writes nothing (its own commit would move the horizon again)
            return outcome, False
        erased = erased_scopes(rows)
        counted = await store.counted_rows(conn, touched_slots(rows), erased)
        keys = sorted({r.key for r in rows if r.kind == ChangeKind.PREFERENCE})
        plan = Planner(counted, await sensitivity(catalog, keys)).apply(rows)
        more = len(rows) == limit
        # Below the horizon nothing can still appear, so a short batch moves the position up to it.
        new_position = rows[-1].position if more else max(position, FeedCursor.at_horizon(horizon))
        await _write(conn, plan, new_position)
        outcome.counted, outcome.erasures, outcome.keys = plan.applied, plan.erasures, set(keys)
    return outcome, more


async def _write(conn: asyncpg.Connection, plan: Plan, position: FeedCursor | None) -> None:
    """Everything read first (no transaction id yet), then one statement for the figures and one for the
    daily rows, so the feed horizon is held back as briefly as possible."""
    values_before, keys_before = await store.touched_figures(conn, plan)
    await store.write(conn, plan, writes_of(plan, values_before, keys_before), position)
    await store.write_days(conn, plan)


async def erase_user(conn: asyncpg.Connection, user_id: str) -> int:
    """Take a user out of every count now, inside an erasure's transaction; returns the rows removed."""
    await store.lock_apply(conn)
    counted = await store.counted_rows(conn, (), [user_id])
    planner = Planner(counted, {})
    planner.erase(ScopeKind.USER.value, user_id, datetime.now(UTC).date())
    await _write(conn, planner.plan, None)
    return len(counted)


async def reset(conn: asyncpg.Connection) -> None:
    """Forget every figure; the next batches count the whole retained feed again."""
    async with conn.transaction():
        await store.lock_apply(conn)
        await store.reset(conn)


async def catch_up(conn: asyncpg.Connection, catalog: KeyCatalog) -> BatchOutcome:
    """Apply batches until the position reaches the feed's horizon; the totals."""
    total = BatchOutcome()
    more = True
    while more:
        outcome, more = await apply_batch(conn, catalog)
        total.events += outcome.events
        total.counted += outcome.counted
        total.erasures += outcome.erasures
        total.keys |= outcome.keys
    return total


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection of the runner's own (not the pool's: it holds the runner lock for its lifetime)."""
    # A hung database ends a batch (rolled back) rather than the runner: it reconnects and resumes.
    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": "prefd-statistics"}, command_timeout=STATEMENT_TIMEOUT_S
    )
    await init_connection(conn)
    return conn


class StatisticsRunner:
    """Keeps the statistics current in this process while it holds the runner lock; otherwise stands by,
    trying again every `standby_s` (so a crashed runner's process is replaced within that time)."""

    def __init__(
        self,
        dsn: str,
        catalog: KeyCatalog,
        poll_interval_s: float = 1.0,
        pace_s: float = 0.25,
        standby_s: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self._catalog = catalog
        self._poll_interval_s = poll_interval_s
        self._pace_s = pace_s
        self._standby_s = standby_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active = False
        self.batches = 0

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: preference changes or an erasure arrived, so count them soon."""
        if self.active and any(event.kind in _COUNTED_KINDS for event in events):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prefd-statistics")

    async def stop(self) -> None:
        """Stop counting; the lock goes with the runner's connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.active = False

    async def _run(self) -> None:
        while True:
            try:
                await self._serve()
            except _DATABASE_ERRORS as exc:
                log.warning("statistics runner lost the database: %s", exc)
            self.active = False
            await asyncio.sleep(self._standby_s)

    async def _serve(self) -> None:
        conn = await connect(self._dsn)
        try:
            if not await store.try_runner_lock(conn):
                return
            self.active = True
            log.info("statistics runner started")
            while True:
                started = time.monotonic()
                await catch_up(conn, self._catalog)
                self.batches += 1
                # At most one catch-up per pace: under load a batch gathers many changes.
                await asyncio.sleep(max(0.0, self._pace_s - (time.monotonic() - started)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            conn.terminate()
