"""The change feed under load, checked from the outside: an independent history checker over real watch
streams on two server processes, a write transaction held open across the feed horizon, and cache
coherence between two processes (sampled under load, then its two races staged deterministically)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import init_connection, lock_scope
from prefd_server.kernel.model import CallInfo, KeyChange, Scope, ScopeKind
from prefd_server.kernel.parts import CACHE_FIGURES
from prefd_server.kernel.tokens import TokenKey
from prefd_server.preferences import store as preference_sql
from tests.helpers.auth import auth, unique
from tests.helpers.history import Applied, FeedWatch, check_history, dump_values, same, scope_of
from tests.helpers.processes import prefd_process
from tests.helpers.requests import GLOBAL, org, py, set_request, token_key, user
from tests.helpers.settings import make_settings, process_env

ADMIN = auth("admin")
# Shipped keys of simple types that take part in no cross-field rule, with values they accept.
VALUE_POOL: dict[str, list[Any]] = {
    "display.items_per_page": list(range(1, 201)),
    "ui.rowsPerPage": [10, 25, 50, 100],
    "display.theme": ["light", "dark", "system"],
    "display.dashboard_layout": ["grid", "list", "compact"],
    "ui.theme": ["light", "dark", "system"],
    "ui.tableDensity": ["compact", "comfortable", "spacious"],
    "locale.language": ["en", "de", "fr", "es", "it", "nl", "pt", "ja", "de-CH", "en-GB"],
    "locale.timezone": ["UTC", "Europe/Berlin", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney"],
    "notifications.frequency": ["immediate", "daily", "weekly"],
    "behavior.auto_save": [True, False],
    "ui.sidebarCollapsed": [True, False],
    "notifications.email.enabled": [True, False],
}


# --- plumbing ----------------------------------------------------------------------------------


def server_env(url: str) -> dict[str, str]:
    """Environment of a child-process server on `url` (REDIS_URL, when set, is inherited)."""
    return process_env(url, PREFD_WATCH_PROGRESS_INTERVAL_S="0.5")


@contextlib.asynccontextmanager
async def child_server(url: str) -> AsyncIterator[tuple[int, list[str]]]:
    """A `prefd serve` child process on `url` and its output lines."""
    async with prefd_process(server_env(url)) as (_proc, port, lines):
        yield port, lines  # prefd_process keeps reading its output into `lines`


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


def stub_for(channel: grpc.aio.Channel) -> preferences_pb2_grpc.PreferencesServiceStub:
    return preferences_pb2_grpc.PreferencesServiceStub(channel)


# --- watchers -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Watcher(FeedWatch):
    """A subject watch that records every event; optionally cancels itself and resumes from its cursor."""

    name: str
    stub: preferences_pb2_grpc.PreferencesServiceStub
    tokens: TokenKey
    subject: common_pb2.Subject
    restart_every: int | None = None
    events: list[Applied] = field(default_factory=list)
    latest: dict[tuple[str, str, str], int] = field(default_factory=dict)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    progress_seen: int = 0
    restarts: int = 0
    other_kinds: int = 0
    last_cursor: str = ""
    stopped: BaseException | None = None

    async def _follow(self) -> None:
        rng = random.Random(self.name)
        while True:
            request = preferences_pb2.WatchPreferencesRequest(subject=self.subject)
            resume_from = self.last_cursor
            if resume_from:
                request.start_cursor.token = resume_from
            call = self.stub.WatchPreferences(request, metadata=ADMIN)
            budget = (
                self.restart_every + rng.randint(-self.restart_every // 4, self.restart_every // 4)
                if self.restart_every
                else None
            )
            first = True
            async for message in call:
                which = message.WhichOneof("message")
                if first:
                    assert which == "started", f"{self.name}: first message is {which}"
                    if resume_from:
                        # The stream resumes exactly where the previous one left off.
                        assert self.position(message.started.cursor.token) == self.position(resume_from)
                    else:
                        self.last_cursor = message.started.cursor.token
                    first = False
                    self.started.set()
                elif which == "change":
                    change = message.change
                    if change.kind != common_pb2.CHANGE_KIND_PREFERENCE:
                        self.other_kinds += 1
                    else:
                        applied = Applied.received(change, self.position(change.cursor.token))
                        self.events.append(applied)
                        applied.raise_latest(self.latest)
                    self.last_cursor = change.cursor.token
                    if budget is not None:
                        budget -= 1
                elif which == "progress":
                    self.last_cursor = message.progress.cursor.token
                    self.progress_seen += 1
                else:
                    raise AssertionError(f"{self.name}: unexpected {which}")
                async with self.changed:
                    self.changed.notify_all()
                if budget is not None and budget <= 0:
                    call.cancel()
                    self.restarts += 1
                    break
            else:
                raise AssertionError(f"{self.name}: stream ended: {call.code() if call.done() else '?'}")

    async def wait_for_state(self, target: Mapping[tuple[str, str, str], int], deadline_s: float) -> None:
        """Until every (scope, key) of `target` is at its version, then one idle bookmark more."""
        async with asyncio.timeout(deadline_s), self.changed:
            await self.changed.wait_for(
                lambda: self.stopped is not None or all(self.latest.get(k, 0) >= v for k, v in target.items())
            )
            seen = self.progress_seen
            await self.changed.wait_for(lambda: self.stopped is not None or self.progress_seen > seen)
        if self.stopped is not None:
            raise AssertionError(f"{self.name} stopped: {self.stopped!r}")


# --- 1. history checker -------------------------------------------------------------------------

JITTER_SQL = """
CREATE FUNCTION prefd_test_jitter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(random() * 0.003);
    RETURN NULL;
END;
$$;
CREATE TRIGGER prefd_test_jitter BEFORE INSERT ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION prefd_test_jitter();
"""
UNJITTER_SQL = "DROP TRIGGER IF EXISTS prefd_test_jitter ON changes; DROP FUNCTION IF EXISTS prefd_test_jitter();"

TARGET_CHANGES = 20_000
WRITERS = 8


async def test_concurrent_writers_on_two_processes_give_every_watcher_a_gap_free_history(
    fresh_database: Any, tmp_path: Path
) -> None:
    url = await fresh_database()
    o1, u1, u2 = "o1", "u1", "u2"
    write_scopes = [GLOBAL, org(o1), user(u1), user(u2)]
    watched = {("GLOBAL", ""), ("ORG", o1), ("USER", u1)}
    subject = common_pb2.Subject(user_id=u1, org_id=o1)
    seed = random.randrange(1 << 32)
    began = time.monotonic()
    async with App(make_settings(url, tmp_path)) as app_a, connect(url) as db:
        tokens = await token_key(db)
        await db.execute(JITTER_SQL)
        try:
            async with (
                child_server(url) as (port_b, _lines_b),
                grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as write_a,
                grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as write_b,
                grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as watch_1,
                grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as watch_2,
                grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as watch_3,
            ):
                watchers = [
                    Watcher("W1@A", stub_for(watch_1), tokens, subject),
                    Watcher("W2@B", stub_for(watch_2), tokens, subject),
                    Watcher("W3@A-resuming", stub_for(watch_3), tokens, subject, restart_every=2000),
                ]
                tasks = [asyncio.create_task(w.run(), name=w.name) for w in watchers]
                try:
                    async with asyncio.timeout(10):
                        await asyncio.gather(*(w.started.wait() for w in watchers))

                    stubs = [stub_for(write_a), stub_for(write_b)]
                    written = 0  # change rows the replies report
                    calls = Counter[str]()

                    async def writer(index: int) -> None:
                        nonlocal written
                        rng = random.Random(f"{seed}-writer-{index}")
                        n = 0
                        while written < TARGET_CHANGES:
                            stub = stubs[(index + n) % 2]
                            n += 1
                            scope = rng.choice(write_scopes)
                            keys = rng.sample(sorted(VALUE_POOL), rng.randint(3, 5))
                            if rng.random() < 0.08:
                                deleted = await stub.DeletePreferences(
                                    preferences_pb2.DeletePreferencesRequest(scope=scope, keys=keys[:2]),
                                    metadata=ADMIN,
                                    timeout=30,
                                )
                                written += len(deleted.changes)
                                calls["delete"] += 1
                            else:
                                values = {k: rng.choice(VALUE_POOL[k]) for k in keys}
                                reply = await stub.SetPreferences(
                                    set_request(scope, values), metadata=ADMIN, timeout=30
                                )
                                written += len(reply.changes)
                                calls["set"] += 1

                    async with asyncio.timeout(90):
                        await asyncio.gather(*(writer(i) for i in range(WRITERS)))
                    writes_done = time.monotonic()

                    final = await dump_values(db)
                    rows = await db.fetchval("SELECT count(*) FROM changes WHERE kind = 'preference'")
                    # Every change a reply reported is exactly one change row, and there are enough of them.
                    assert rows == written >= TARGET_CHANGES
                    assert any(name[:2] == ("USER", u2) for name in final), "u2 was never written"
                    assert sum(v for (kind, sid, _k), (_v, v) in final.items() if (kind, sid) in watched) > 10_000
                    target = {name: version for name, (_v, version) in final.items() if name[:2] in watched}

                    for watcher in watchers:
                        try:
                            await watcher.wait_for_state(target, deadline_s=20)
                        except TimeoutError:
                            problems = check_history(watcher.events, final, watched)
                            raise AssertionError(
                                f"seed {seed}: {watcher.name} did not reach the final state; "
                                f"{len(watcher.events)} events; " + "; ".join(problems[:20])
                            ) from None
                    caught_up = time.monotonic()
                finally:
                    for task in tasks:
                        task.cancel()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                for watcher, result in zip(watchers, results, strict=True):
                    # A watcher that stopped with an error (assertion, stream end) shows it here.
                    assert isinstance(result, asyncio.CancelledError), f"{watcher.name}: {result!r}"

                for watcher in watchers:
                    problems = check_history(watcher.events, final, watched)
                    assert not problems, f"seed {seed}: {watcher.name}: " + "\n".join(problems[:30])
                    assert not any(e.scope == ("USER", u2) for e in watcher.events)
                    assert watcher.other_kinds == 0
                    assert len(watcher.events) == sum(target.values())
                assert watchers[2].restarts >= 5, watchers[2].restarts
                print(
                    f"\nhistory: {rows} change rows ({dict(calls)} calls) in {writes_done - began:.1f}s, "
                    f"watchers caught up {caught_up - writes_done:.2f}s later; "
                    f"{[len(w.events) for w in watchers]} events, W3 resumed {watchers[2].restarts}x"
                )
        finally:
            await db.execute(UNJITTER_SQL)


# --- 2. a long write transaction holds the feed back ----------------------------------------------


async def test_feed_waits_behind_a_write_transaction_held_open(fresh_database: Any, tmp_path: Path) -> None:
    url = await fresh_database()
    oid, uid = unique("o"), unique("u")
    held_scope = Scope(ScopeKind.ORG, oid)
    async with (
        App(make_settings(url, tmp_path)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
        connect(url) as slow,
        connect(url) as db,
    ):
        assert app.feed is not None
        stub = stub_for(channel)
        tokens = await token_key(db)

        def position(token: str) -> FeedCursor:
            return FeedCursor.decode(token, tokens)

        call = stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=uid, org_id=oid)),
            metadata=ADMIN,
        )
        messages: asyncio.Queue[preferences_pb2.WatchPreferencesResponse] = asyncio.Queue()

        async def pump() -> None:
            async for message in call:
                await messages.put(message)

        pumping = asyncio.create_task(pump())
        try:
            async with asyncio.timeout(5):
                assert (await messages.get()).WhichOneof("message") == "started"

            # A writer that went through the server's own path and then stalls before committing.
            held = slow.transaction()
            await held.start()
            await lock_scope(slow, held_scope)
            held_xid = await preference_sql.apply_changes(
                slow, held_scope, [KeyChange("display.theme", None, "dark", 0, 1)], CallInfo(actor="slow"), "held"
            )
            assert held_xid is not None

            # A later write to another watched scope commits first, with a higher xid.
            reply = await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 42}), metadata=ADMIN)
            assert [c.new_version for c in reply.changes] == [1]
            row = await db.fetchrow(
                "SELECT xid::text::bigint AS xid, id FROM changes WHERE scope_kind = 'USER' AND scope_id = $1", uid
            )
            later = FeedCursor(row["xid"], row["id"])
            assert later.xid > held_xid

            # The committed later write is not released while an older transaction may still commit.
            assert not await app.feed.wait_past(later, timeout_s=1.0)
            assert app.feed.position.xid <= held_xid
            # Meanwhile the stream only sends bookmarks, each short of the held transaction.
            progress = 0
            async with asyncio.timeout(5):
                while progress < 2:
                    message = await messages.get()
                    assert message.WhichOneof("message") == "progress", message
                    assert position(message.progress.cursor.token).xid <= held_xid
                    progress += 1

            await held.commit()
            changes = []
            async with asyncio.timeout(5):
                while len(changes) < 2:
                    message = await messages.get()
                    if message.WhichOneof("message") == "change":
                        changes.append(message.change)
            first, second = changes
            assert (scope_of(first.scope), first.key, first.version, py(first.new_value), first.actor) == (
                ("ORG", oid),
                "display.theme",
                1,
                "dark",
                "slow",
            )
            assert position(first.cursor.token).xid == held_xid
            assert (scope_of(second.scope), second.key, second.version, py(second.new_value)) == (
                ("USER", uid),
                "display.items_per_page",
                1,
                42,
            )
            assert position(second.cursor.token) == later
            assert await app.feed.wait_past(later, timeout_s=5.0)
        finally:
            call.cancel()
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)


# --- 3. cache coherence across two processes ------------------------------------------------------


@dataclass(eq=False)
class ProcessView:
    """What one server process has answered: the highest (layer, version) per key, and its latest read."""

    name: str
    stub: preferences_pb2_grpc.PreferencesServiceStub
    best: dict[str, tuple[int, int]] = field(default_factory=dict)
    latest: dict[str, tuple[Any, int, int]] = field(default_factory=dict)  # key -> (value, layer, version)
    reads: int = 0
    went_back: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def read(self, request: preferences_pb2.GetEffectivePreferencesRequest) -> None:
        # Only reads that completed before this one started bind it (overlapping reads may cross).
        floor = dict(self.best)
        reply = await self.stub.GetEffectivePreferences(request, metadata=ADMIN, timeout=10)
        for value in reply.values:
            got = (value.provenance.layer, value.provenance.version)
            if got < floor.get(value.key, (0, 0)):
                self.went_back.append(f"{self.name}: {value.key} {got} after {floor[value.key]}")
            self.best[value.key] = max(self.best.get(value.key, (0, 0)), got)
            self.latest[value.key] = (py(value.value), *got)
        self.reads += 1
        async with self.changed:
            self.changed.notify_all()

    async def wait_until(self, predicate: Any, deadline_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(deadline_s), self.changed:
                await self.changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not show {what} within {deadline_s}s; it shows {self.latest}"
            ) from None


async def test_two_processes_never_serve_older_versions_and_converge(fresh_database: Any, tmp_path: Path) -> None:
    url = await fresh_database()
    oid, uid = unique("o"), unique("u")
    subject = common_pb2.Subject(user_id=uid, org_id=oid)
    # Each key is written at one scope only, so its provenance (layer, version) only ever grows.
    plan = [
        (user(uid), common_pb2.LAYER_USER, "display.items_per_page", list(range(1, 201))),
        (org(oid), common_pb2.LAYER_ORG, "ui.rowsPerPage", [10, 25, 50, 100]),
        (GLOBAL, common_pb2.LAYER_GLOBAL, "display.theme", ["light", "dark", "system"]),
    ]
    request = preferences_pb2.GetEffectivePreferencesRequest(
        subject=subject, key_prefixes=[key for _s, _l, key, _v in plan]
    )
    async with (
        App(make_settings(url, tmp_path)) as app_a,
        child_server(url) as (port_b, _lines_b),
        grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel_b,
        connect(url) as db,
    ):
        view_a = ProcessView("A", stub_for(channel_a))
        view_b = ProcessView("B", stub_for(channel_b))
        stop = asyncio.Event()

        async def reader(view: ProcessView) -> None:
            while not stop.is_set():
                await view.read(request)

        async def noise(stub: preferences_pb2_grpc.PreferencesServiceStub, key: str) -> None:
            # Other keys of the same scopes, written through both processes: layers keep being invalidated
            # and re-read while the watched keys are written, so reads straddle commits.
            flag = False
            while not stop.is_set():
                flag = not flag
                for scope, _layer, _key, _values in plan:
                    await stub.SetPreferences(set_request(scope, {key: flag}), metadata=ADMIN, timeout=10)

        readers = [asyncio.create_task(reader(v)) for v in (view_a, view_b) for _ in range(3)]
        readers += [
            asyncio.create_task(noise(stub_for(channel_a), "behavior.auto_save")),
            asyncio.create_task(noise(stub_for(channel_b), "ui.sidebarCollapsed")),
        ]
        try:
            writer_a = stub_for(channel_a)
            b_waits = []
            for i in range(90):
                scope, layer, key, values = plan[i % len(plan)]
                reply = await writer_a.SetPreferences(
                    set_request(scope, {key: values[(i // len(plan) + 1) % len(values)]}), metadata=ADMIN, timeout=10
                )
                (change,) = reply.changes
                written = (layer, change.new_version)
                assert change.new_version == i // len(plan) + 1
                # The writing process reads its own write at once.
                await view_a.read(request)
                assert view_a.latest[key][1:] >= written, (key, view_a.latest[key], written)
                # The other process catches up within a deadline (its readers keep asking).
                start = time.monotonic()
                await view_b.wait_until(
                    lambda k=key, w=written: view_b.best.get(k, (0, 0)) >= w, 5, f"{key} at {written}"
                )
                b_waits.append(time.monotonic() - start)

            stored = {
                r["key"]: (r["value"], r["version"])
                for r in await db.fetch(
                    "SELECT key, value, version FROM preference_values WHERE key = ANY($1::text[])",
                    [key for _s, _l, key, _v in plan],
                )
            }
            assert len(stored) == len(plan)
            expected = {key: (stored[key][0], layer, stored[key][1]) for _s, layer, key, _v in plan}
            for view in (view_a, view_b):
                # Convergence: a read that completes after the last write shows the stored values.
                await view.wait_until(
                    lambda v=view: all(
                        v.latest.get(k) is not None and same(v.latest[k][0], want[0]) and v.latest[k][1:] == want[1:]
                        for k, want in expected.items()
                    ),
                    5,
                    f"the stored values {expected}",
                )
        finally:
            stop.set()
            async with asyncio.timeout(15):
                results = await asyncio.gather(*readers, return_exceptions=True)
        assert all(r is None for r in results), results
        assert not view_a.went_back and not view_b.went_back, (view_a.went_back + view_b.went_back)[:20]
        assert view_a.reads > 90 and view_b.reads > 90
        print(
            f"\ncoherence: reads A={view_a.reads} B={view_b.reads}; B caught up in "
            f"max {max(b_waits) * 1000:.0f} ms, median {sorted(b_waits)[len(b_waits) // 2] * 1000:.1f} ms"
        )


async def test_a_process_never_serves_an_older_version_than_it_already_served(
    fresh_database: Any, tmp_path: Path
) -> None:
    """The race test 3 samples, pinned down: B learns of A's write late (its feed is held back by an open
    transaction) while one of B's reads loads the scope from PostgreSQL and serves the new version; B's
    later reads must not fall back to the older version it still holds elsewhere in its caches."""
    url = await fresh_database()
    oid, uid = unique("o"), unique("u")
    subject = common_pb2.Subject(user_id=uid, org_id=oid)
    key = "display.items_per_page"
    narrow = preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=[key])
    wide = preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=["display."])

    def version(reply: preferences_pb2.GetEffectivePreferencesResponse) -> tuple[int, int, Any]:
        (value,) = [v for v in reply.values if v.key == key]
        return value.provenance.layer, value.provenance.version, py(value.value)

    async with (
        App(make_settings(url, tmp_path / "a")) as app_a,
        App(make_settings(url, tmp_path / "b")) as app_b,
        grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{app_b.port}") as channel_b,
        connect(url) as db,
        connect(url) as holder,
    ):
        assert app_b.feed is not None
        stub_a, stub_b = stub_for(channel_a), stub_for(channel_b)
        await stub_a.SetPreferences(set_request(user(uid), {key: 10}), metadata=ADMIN)
        row = await db.fetchrow("SELECT xid::text::bigint AS xid, id FROM changes WHERE scope_id = $1", uid)
        assert await app_b.feed.wait_past(FeedCursor(row["xid"], row["id"]), timeout_s=5)
        assert version(await stub_b.GetEffectivePreferences(narrow, metadata=ADMIN)) == (common_pb2.LAYER_USER, 1, 10)

        held = holder.transaction()
        await held.start()
        try:
            # An open transaction with an xid: no feed reader passes it, so B hears of nothing newer.
            await holder.fetchval("SELECT pg_current_xact_id()")
            # B's own write to the scope drops what B cached of it; B's next read reloads it.
            await stub_b.SetPreferences(set_request(user(uid), {"behavior.auto_save": False}), metadata=ADMIN)
            served = [version(await stub_b.GetEffectivePreferences(narrow, metadata=ADMIN))]
            # A's write commits; B's feed cannot deliver it yet.
            reply = await stub_a.SetPreferences(set_request(user(uid), {key: 20}), metadata=ADMIN)
            assert [c.new_version for c in reply.changes] == [2]
            served.append(version(await stub_b.GetEffectivePreferences(wide, metadata=ADMIN)))
            served.append(version(await stub_b.GetEffectivePreferences(narrow, metadata=ADMIN)))
            served.append(version(await stub_b.GetEffectivePreferences(wide, metadata=ADMIN)))
            # Every read on B started after the previous one returned: versions never go back.
            assert all(a[:2] <= b[:2] for a, b in itertools.pairwise(served)), served
        finally:
            await held.rollback()
        async with asyncio.timeout(5):
            while version(await stub_b.GetEffectivePreferences(narrow, metadata=ADMIN)) != (
                common_pb2.LAYER_USER,
                2,
                20,
            ):
                pass  # each call is a real round trip; the deadline bounds it


GATE_SQL = """
CREATE FUNCTION prefd_test_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(4242);
    RETURN NULL;
END;
$$;
CREATE TRIGGER prefd_test_gate BEFORE INSERT ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION prefd_test_gate();
"""


async def test_a_read_that_starts_after_a_write_returned_sees_it(fresh_database: Any, tmp_path: Path) -> None:
    """Read-your-writes on the writing process, even while an older read of the same scope is still loading.

    Staged with locks, not timing: R1 takes its snapshot before the write commits and then waits on
    the table; R2 starts after the write returned, while R1 is still loading.
    """
    url = await fresh_database()
    oid, uid = unique("o"), unique("u")
    key = "display.items_per_page"
    request = preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=uid, org_id=oid), key_prefixes=[key]
    )

    def version(reply: preferences_pb2.GetEffectivePreferencesResponse) -> tuple[int, Any]:
        (value,) = reply.values
        return value.provenance.version, py(value.value)

    async def until_waiting(conn: asyncpg.Connection, query: str) -> None:
        # PostgreSQL reports lock waits only in pg_locks; poll it under a deadline.
        async with asyncio.timeout(10):
            while not await conn.fetchval(query):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    # pg_locks shows the whole cluster: count only waits in this test's database.
    in_this_database = "database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    waits_on_table = f"""SELECT count(*) FROM pg_locks
        WHERE relation = 'preference_values'::regclass AND NOT granted AND mode = $1 AND {in_this_database}"""
    # The gate's single-bigint advisory key 4242 shows as classid 0, objid 4242, objsubid 1.
    waits_on_gate = f"""SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted AND classid = 0 AND objid = 4242 AND objsubid = 1
          AND {in_this_database}"""
    async with (
        App(make_settings(url, tmp_path)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
        connect(url) as db,
        connect(url) as gate,
        connect(url) as locker,
    ):
        assert app.kernel is not None
        figures = app.kernel.provisions.get(CACHE_FIGURES)
        stub = stub_for(channel)
        await stub.SetPreferences(set_request(user(uid), {key: 10}), metadata=ADMIN)
        await db.execute(GATE_SQL)
        tasks: list[asyncio.Future[Any]] = []
        try:
            # The write W stops inside its transaction, after storing the value, before its change row.
            await gate.execute("SELECT pg_advisory_lock(4242)")
            write = asyncio.ensure_future(stub.SetPreferences(set_request(user(uid), {key: 20}), metadata=ADMIN))
            tasks.append(write)
            await until_waiting(db, waits_on_gate)
            # An exclusive table lock queues behind W; every later read of the table queues behind it.
            held = locker.transaction()
            await held.start()
            tasks.append(asyncio.create_task(locker.execute("LOCK TABLE preference_values IN ACCESS EXCLUSIVE MODE")))
            await until_waiting(db, waits_on_table.replace("$1", "'AccessExclusiveLock'"))
            # R1 snapshots before W commits, then waits on the table.
            first = asyncio.ensure_future(stub.GetEffectivePreferences(request, metadata=ADMIN))
            tasks.append(first)
            await until_waiting(db, waits_on_table.replace("$1", "'AccessShareLock'"))
            # W commits and returns.
            await gate.execute("SELECT pg_advisory_unlock(4242)")
            reply = await asyncio.wait_for(write, 10)
            assert [c.new_version for c in reply.changes] == [2]
            # R2 starts after W returned, while R1 is still loading.
            misses = figures.by_layer()[1]["l1"]
            second = asyncio.ensure_future(stub.GetEffectivePreferences(request, metadata=ADMIN))
            tasks.append(second)
            async with asyncio.timeout(10):
                while figures.by_layer()[1]["l1"] == misses:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)  # R2 has reached the cache; nothing else observes that
            await held.rollback()
            async with asyncio.timeout(10):
                assert version(await first) in {(1, 10), (2, 20)}
                assert version(await second) == (2, 20), "a read that began after the write returned missed it"
                assert version(await stub.GetEffectivePreferences(request, metadata=ADMIN)) == (2, 20)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gate.execute("SELECT pg_advisory_unlock_all()")
            await db.execute(
                "DROP TRIGGER IF EXISTS prefd_test_gate ON changes; DROP FUNCTION IF EXISTS prefd_test_gate();"
            )
