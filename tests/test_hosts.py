"""Two prefd hosts, each in a network namespace of its own, sharing one PostgreSQL and one Redis reached over
veth links: writes on host A reach watchers on host B, a throttle charged on one host holds on the other, a
read cached on B follows a write on A; then B is cut off from PostgreSQL and Redis by a real partition
(every packet on its links dropped, connections left hanging) and healed. B must report the outage
within its health bounds, refuse what needs the database at once (also a read that would join a load the
partition hung), and after a partition long enough for TCP's retransmissions to back off far past the
heal, serve again within its bounds with its watchers caught up at once and none of its streams broken
after the heal; the history checker must find nothing lost, duplicated or reordered in what B's watchers
received.

Needs root (network namespaces); CI runs the suite as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from prefd.v1 import common_pb2, notifications_pb2, notifications_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from prefd.v1 import health_pb2 as prefd_health_pb2
from prefd.v1 import health_pb2_grpc as prefd_health_pb2_grpc
from prefd_server.kernel.db import init_connection
from prefd_server.settings import Settings
from tests.helpers.auth import auth, unique
from tests.helpers.health import NOT_SERVING, SERVING
from tests.helpers.history import check_history, dump_values, scope_of
from tests.helpers.netns import Host, host_network, postgres_target, prefd_in_namespace, redis_target
from tests.helpers.observers import ADMIN, HealthTimeline, PacedWriter, ResumingWatcher
from tests.helpers.processes import RedisServer, free_port
from tests.helpers.requests import GLOBAL, eventually, org, py, set_request, token_key, user
from tests.helpers.settings import process_env

N = notifications_pb2
H = prefd_health_pb2
SERVICE = auth("service", "notifier")
DEFAULTS = Settings()
# "Within its bounds": the monitor probes every health_interval_s and gives a probe health_timeout_s, so
# NOT_SERVING follows a partition within their sum; GetSystemHealth answers within health_timeout_s.
# SLACK_S absorbs scheduling on a busy 2-core machine.
DETECTION_BOUND_S = DEFAULTS.health_interval_s + DEFAULTS.health_timeout_s
SLACK_S = 1.0
# How long the test waits for B to serve again after a heal (the bounds asserted are far tighter).
RECOVERY_DEADLINE_S = 20.0
# Writes A commits while B is cut off before the partition heals.
WRITES_DURING_PARTITION = 60
# How long B's long partition from PostgreSQL lasts: long enough that TCP's retransmissions on the connections
# it left hanging have backed off far past the heal (they answer again only seconds after it), so only
# work that gave up on those connections and opened fresh ones recovers within its bounds.
PARTITION_S = 7.5
# After a heal: SERVING within about 1 s of PostgreSQL's return (README), B's monitor probing on a fresh
# connection rather than the one the partition hung, and B's watchers caught up within SLACK_S of it.
SERVING_AGAIN_BOUND_S = 1.0


def decide(user_id: str, event_type: str, consume: bool = False, key: str = "") -> N.DecideRequest:
    return N.DecideRequest(
        subject=common_pb2.Subject(user_id=user_id),
        event=N.Event(event_type=event_type, category="trading", channels=[N.CHANNEL_EMAIL]),
        consume=consume,
        idempotency_key=key,
    )


def email(reply: N.DecideResponse) -> tuple[str, str, int, str]:
    """(action, reason, throttle remaining, throttle store) of the EMAIL channel."""
    (channel,) = reply.decision.channels
    throttle = reply.decision.throttle
    return N.Action.Name(channel.action), N.Reason.Name(channel.reason), throttle.remaining, throttle.store


async def system_health(channel: grpc.aio.Channel) -> tuple[int, dict[str, int], float]:
    """(overall status, status per component, seconds the call took)."""
    started = time.monotonic()
    reply = await prefd_health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
        H.GetSystemHealthRequest(), metadata=ADMIN, timeout=5
    )
    return reply.status, {c.name: c.status for c in reply.components}, time.monotonic() - started


async def until_health(channel: grpc.aio.Channel, since: float, want: Callable[[int, dict[str, int]], bool]) -> float:
    """Seconds from `since` until GetSystemHealth answers as `want`; every answer must come within its bound."""
    last: tuple[int, dict[str, int]] = (0, {})
    async with asyncio.timeout(RECOVERY_DEADLINE_S):
        while True:
            status, components, took = await system_health(channel)
            assert took < DEFAULTS.health_timeout_s + SLACK_S, f"GetSystemHealth took {took:.2f} s"
            if want(status, components):
                return time.monotonic() - since
            last = (status, components)
            await asyncio.sleep(0.05)  # polling another process's state, bounded by the deadline
    raise AssertionError(f"health stayed {last}")


async def timed_read(
    stub: preferences_pb2_grpc.PreferencesServiceStub, request: preferences_pb2.GetEffectivePreferencesRequest
) -> tuple[str, float, str]:
    """(status code name, seconds, details) of one read with a 5 s deadline."""
    started = time.monotonic()
    try:
        await stub.GetEffectivePreferences(request, metadata=ADMIN, timeout=5)
        code, details = "OK", ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    return code, time.monotonic() - started, details


@contextlib.asynccontextmanager
async def shared_redis() -> AsyncIterator[str]:
    """REDIS_URL's Redis, else a throw-away one."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serving(host: Host, server_url: str, database: str, redis_url: str) -> AsyncIterator[grpc.aio.Channel]:
    """prefd on `host` (its own namespace, default health settings) and a channel to it over its front link."""
    env = process_env(
        host.database_url(server_url, database),
        REDIS_URL=host.redis_url(redis_url),
        PREFD_HOST=host.front.ns_ip,
        PREFD_WATCH_PROGRESS_INTERVAL_S="0.5",
    )
    async with prefd_in_namespace(host.netns, env) as (_proc, port, lines):
        options = [("grpc.enable_http_proxy", 0)]
        async with grpc.aio.insecure_channel(f"{host.front.ns_ip}:{port}", options=options) as channel:
            try:
                yield channel
            except BaseException:
                print(f"--- prefd on host {host.name} said:\n" + "".join(lines[-60:]))
                raise


async def test_two_hosts_stay_coherent_and_b_rides_out_a_partition(
    server_url: str, fresh_database: Any, record_property: Any
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test makes network namespaces and needs root (CI runs as root)")
    url = await fresh_database()
    database = urlparse(url).path.lstrip("/")
    uid, oid, throttled = unique("u"), unique("o"), unique("u")
    subject = common_pb2.Subject(user_id=uid, org_id=oid)
    # Each key is written at one scope only, so its effective provenance is that scope's stored version.
    plan = [
        (user(uid), "display.items_per_page", list(range(1, 201))),
        (org(oid), "ui.rowsPerPage", [10, 25, 50, 100]),
        (GLOBAL, "display.theme", ["light", "dark", "system"]),
        (user(uid), "locale.language", ["en", "de", "fr", "es"]),
    ]
    keys = [key for _scope, key, _values in plan]
    read_subject = preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=keys)
    figures: dict[str, float] = {}

    async with shared_redis() as redis_url:
        postgres = postgres_target(server_url)[0]
        async with (
            host_network(["a", "b"], postgres, redis_target(redis_url)[0]) as hosts,
            serving(hosts["a"], server_url, database, redis_url) as channel_a,
            serving(hosts["b"], server_url, database, redis_url) as channel_b,
        ):
            db = await asyncpg.connect(url)
            await init_connection(db)
            tasks: list[asyncio.Task[None]] = []
            try:
                tokens = await token_key(db)
                stub_a = preferences_pb2_grpc.PreferencesServiceStub(channel_a)
                stub_b = preferences_pb2_grpc.PreferencesServiceStub(channel_b)
                notify_a = notifications_pb2_grpc.NotificationServiceStub(channel_a)
                notify_b = notifications_pb2_grpc.NotificationServiceStub(channel_b)
                on_a = ResumingWatcher("W@A", stub_a, tokens, subject)
                held = ResumingWatcher("W1@B-held", stub_b, tokens, subject)
                resuming = ResumingWatcher("W2@B-resuming", stub_b, tokens, subject)
                watchers = [on_a, held, resuming]
                timeline = HealthTimeline(health_pb2_grpc.HealthStub(channel_b), "prefd.v1.PreferencesService")
                tasks += [asyncio.create_task(w.run(), name=w.name) for w in watchers]
                tasks.append(asyncio.create_task(timeline.run(), name="health of B"))
                for watcher in watchers:
                    await watcher.wait_until(lambda w=watcher: w.streams == 1, 10, "started stream")
                await timeline.first_after(0, SERVING, 10)
                assert (await system_health(channel_b))[0] == H.HEALTH_STATUS_HEALTHY

                # --- 1. coherent while both hosts are connected ---------------------------------------------
                # A write on A reaches B's watchers.
                began = time.monotonic()
                reply = await stub_a.SetPreferences(
                    set_request(user(uid), {"ui.tableDensity": "compact"}), metadata=ADMIN
                )
                first = {("USER", uid, "ui.tableDensity"): reply.changes[0].new_version}
                for watcher in (held, resuming):
                    await watcher.wait_until(lambda w=watcher: w.has(first), 5, "write made on A")
                figures["a_write_to_b_watchers_s"] = time.monotonic() - began

                # A read cached on B follows a write made on A (B's feed reader invalidates its caches).
                async def b_reads(key: str, version: int) -> float:
                    started = time.monotonic()
                    async with asyncio.timeout(RECOVERY_DEADLINE_S):
                        while True:
                            values = (await stub_b.GetEffectivePreferences(read_subject, metadata=ADMIN)).values
                            if {v.key: v.provenance.version for v in values}.get(key, 0) >= version:
                                return time.monotonic() - started
                            await asyncio.sleep(0.01)  # polling B's answer, bounded by the deadline

                await stub_a.SetPreferences(set_request(user(uid), {"display.items_per_page": 7}), metadata=ADMIN)
                for _ in range(2):  # B answers from its cache from the second read on
                    await stub_b.GetEffectivePreferences(read_subject, metadata=ADMIN)
                reply = await stub_a.SetPreferences(
                    set_request(user(uid), {"display.items_per_page": 8}), metadata=ADMIN
                )
                figures["a_write_to_b_cached_read_s"] = await b_reads("display.items_per_page", 2)

                # A throttle rule written on A applies on B, and a throttle charged on A holds on B.
                assert email(await notify_b.Decide(decide(throttled, "ORDER_FILLED"), metadata=SERVICE))[2:] == (0, "")
                rules = {
                    "ORDER_FILLED": {"enabled": True, "throttle_minutes": 60, "throttle_limit": 2},
                    "PRICE_ALERT": {"enabled": True, "throttle_minutes": 60, "throttle_limit": 1},
                }
                await stub_a.SetPreferences(
                    set_request(user(throttled), {"notifications.event_rules": rules}), metadata=ADMIN
                )

                async def b_applies_the_rule() -> bool:
                    reply = await notify_b.Decide(decide(throttled, "ORDER_FILLED"), metadata=SERVICE)
                    return reply.decision.throttle.limit == 2

                await eventually(b_applies_the_rule, 5, interval_s=0.01)
                charges = [
                    email(await notify_a.Decide(decide(throttled, "ORDER_FILLED", True, k), metadata=SERVICE))
                    for k in ("k1", "k2")
                ]
                assert charges == [
                    ("ACTION_SEND_NOW", "REASON_ALLOWED", 1, "redis"),
                    ("ACTION_SEND_NOW", "REASON_ALLOWED", 0, "redis"),
                ]
                assert email(await notify_b.Decide(decide(throttled, "ORDER_FILLED"), metadata=SERVICE)) == (
                    "ACTION_SUPPRESS",
                    "REASON_THROTTLED",
                    0,
                    "redis",
                )
                assert email(await notify_b.Decide(decide(throttled, "ORDER_FILLED", True, "k3"), metadata=SERVICE))[
                    :2
                ] == ("ACTION_SUPPRESS", "REASON_THROTTLED")
                # A retry on B of a charge made on A gets A's answer and charges nothing.
                assert (
                    email(await notify_b.Decide(decide(throttled, "ORDER_FILLED", True, "k1"), metadata=SERVICE))
                    == charges[0]
                )

                # --- 2. a short cut of B's database: a read joining a load the cut hung fails at once ------------
                b = hosts["b"]
                # A subject B never read: its layer is in neither B's memory nor Redis.
                unread = preferences_pb2.GetEffectivePreferencesRequest(
                    subject=common_pb2.Subject(user_id=unique("u"), org_id=oid)
                )
                with b.healed_on_exit():
                    cut = time.monotonic()
                    b.database.cut()
                    # Before B's monitor notices, this read starts a layer load that hangs with its connection.
                    first = asyncio.ensure_future(timed_read(stub_b, unread))
                    await timeline.first_after(cut, NOT_SERVING, 10)
                    # PostgreSQL is known down now: the same read must not wait on the hung load (nor may the
                    # load wait on its connection): both fail with UNAVAILABLE, long before their deadline.
                    joined = await timed_read(stub_b, unread)
                    figures["short_cut_joined_read_s"] = joined[1]
                    assert joined[0] == "UNAVAILABLE" and joined[1] < SLACK_S, joined
                    started = await first
                    figures["short_cut_first_read_s"] = started[1]
                    assert started[0] == "UNAVAILABLE" and started[1] < DETECTION_BOUND_S + SLACK_S, started
                    healed = time.monotonic()
                    b.database.heal()
                await timeline.first_after(healed, SERVING, RECOVERY_DEADLINE_S)

                # --- 3. B loses Redis: DEGRADED, still serving --------------------------------------------------
                stop_writing = asyncio.Event()
                writer = PacedWriter(plan, lambda: stub_a, rate=40)
                writing = asyncio.create_task(writer.run(stop_writing), name="writer")
                tasks.append(writing)
                with b.healed_on_exit():
                    cut = time.monotonic()
                    b.redis.cut()
                    figures["redis_cut_to_degraded_s"] = await until_health(
                        channel_b,
                        cut,
                        lambda s, c: s == H.HEALTH_STATUS_DEGRADED and c["redis"] == H.HEALTH_STATUS_DEGRADED,
                    )
                    assert figures["redis_cut_to_degraded_s"] < DEFAULTS.health_timeout_s + SLACK_S
                    assert not [s for at, s in timeline.seen if at >= cut and s != SERVING]
                    # Writes and reads on B go on; its throttles fall back to PostgreSQL, as documented.
                    await stub_b.SetPreferences(
                        set_request(user(uid), {"locale.language": "it"}), metadata=ADMIN, timeout=5
                    )
                    assert (
                        email(await notify_b.Decide(decide(throttled, "PRICE_ALERT"), metadata=SERVICE, timeout=5))[3]
                        == "postgresql"
                    )

                    # --- 4. B loses PostgreSQL too: NOT_SERVING, refuses at once, watchers hold ----------------
                    cut = time.monotonic()
                    b.database.cut()
                    figures["database_cut_to_not_serving_s"] = await timeline.first_after(cut, NOT_SERVING, 10)
                    figures["database_cut_to_unhealthy_s"] = await until_health(
                        channel_b,
                        cut,
                        lambda s, c: (
                            s == H.HEALTH_STATUS_UNHEALTHY
                            and c["postgresql"] == H.HEALTH_STATUS_UNHEALTHY
                            and c["redis"] == H.HEALTH_STATUS_DEGRADED
                        ),
                    )
                    assert figures["database_cut_to_not_serving_s"] < DETECTION_BOUND_S + SLACK_S, figures
                    started = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub_b.SetPreferences(
                            set_request(user(uid), {"ui.theme": "dark"}), metadata=ADMIN, timeout=5
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - started < SLACK_S
                    # A client whose stream to B ends now resumes from its cursor; B refuses until it heals.
                    resuming.drop()
                    await resuming.wait_until(lambda: resuming.refused >= 1, 5, "refused resume")
                    # A is unaffected: its writes go on and its own watcher follows them.
                    await writer.wait_for_count(writer.count + WRITES_DURING_PARTITION, 10)
                    during = dict(writer.written)
                    await on_a.wait_until(lambda: on_a.has(during), 5, "writes made during the partition")
                    # The outage's length is what is under test here, not a wait for an event.
                    await asyncio.sleep(PARTITION_S - (time.monotonic() - cut))
                    assert resuming.streams == 1  # refused all along

                    # --- 5. heal: SERVING again, watchers caught up from their cursors --------------------------
                    before_heal = dict(writer.written)
                    healed = time.monotonic()
                    b.database.heal()
                    b.redis.heal()
                figures["heal_to_serving_s"] = await timeline.first_after(healed, SERVING, RECOVERY_DEADLINE_S)
                for watcher, figure in (
                    (held, "heal_to_held_watcher_caught_up_s"),
                    (resuming, "heal_to_resumed_watcher_caught_up_s"),
                ):
                    await watcher.wait_until(lambda w=watcher: w.has(before_heal), RECOVERY_DEADLINE_S, "catch-up")
                    figures[figure] = time.monotonic() - healed
                # The monitor's probe does not wait on its connection from the outage, nor the feed reader on its own.
                assert figures["heal_to_serving_s"] < SERVING_AGAIN_BOUND_S + SLACK_S, figures
                for figure in ("heal_to_held_watcher_caught_up_s", "heal_to_resumed_watcher_caught_up_s"):
                    assert figures[figure] < figures["heal_to_serving_s"] + SLACK_S, figures
                # No stream of B broke once PostgreSQL was back: no change reached it while B still held the
                # database down. (One that was resolving a change when the partition struck ends with
                # UNAVAILABLE then, as every call needing the database does, and resumes from its cursor.)
                assert not [end for watcher in (held, resuming) for end in watcher.broken if end[0] >= healed], (
                    held.broken,
                    resuming.broken,
                )
                figures["heal_to_healthy_s"] = await until_health(
                    channel_b, healed, lambda s, c: s == H.HEALTH_STATUS_HEALTHY
                )
                figures["heal_to_b_cached_read_current_s"] = (
                    time.monotonic()
                    - healed
                    + await b_reads("display.items_per_page", before_heal[("USER", uid, "display.items_per_page")])
                )
                assert resuming.streams >= 2 and resuming.refused >= 1

                # Throttles are shared again: charged on B, seen on A.
                assert email(await notify_b.Decide(decide(throttled, "PRICE_ALERT", True, "k4"), metadata=SERVICE)) == (
                    "ACTION_SEND_NOW",
                    "REASON_ALLOWED",
                    0,
                    "redis",
                )
                assert email(await notify_a.Decide(decide(throttled, "PRICE_ALERT"), metadata=SERVICE)) == (
                    "ACTION_SUPPRESS",
                    "REASON_THROTTLED",
                    0,
                    "redis",
                )

                # --- 6. the history checker over everything each watcher received ------------------------------
                writer.target = lambda: stub_b  # B writes again too
                await writer.wait_for_count(writer.count + 10, 10)
                stop_writing.set()
                await writing
                final = await dump_values(db)
                watched = {("GLOBAL", ""), ("ORG", oid), ("USER", uid)}
                target = {name: version for name, (_v, version) in final.items() if name[:2] in watched}
                for watcher in watchers:
                    await watcher.wait_until(lambda w=watcher: w.has(target), 10, "final state")
                    problems = check_history(watcher.events, final, watched)
                    assert not problems, f"{watcher.name}: " + "\n".join(problems[:30])
                    assert len(watcher.events) == sum(target.values())
                values = (await stub_b.GetEffectivePreferences(read_subject, metadata=ADMIN)).values
                # B's reads end on the database's final state.
                got = {v.key: (py(v.value), v.provenance.version) for v in values}
                want = {key: final[(*scope_of(scope), key)] for scope, key, _values in plan}
                assert got == want
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await db.close()

    figures["partition_s"] = healed - cut
    figures["b_streams_broken_by_the_cuts"] = len(held.broken) + len(resuming.broken)
    for name, value in figures.items():
        record_property(name, round(value, 3))
    print("\npartition figures: " + ", ".join(f"{k}={v:.3f}" for k, v in figures.items()))
