"""Every call ends by its deadline, also against a hung PostgreSQL; with PostgreSQL known down, calls
that need it fail at once and recover by themselves when it answers again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefd.client import from_rpc_error
from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.health import NOT_SERVING, SERVING, next_status
from tests.helpers.metrics import scrape
from tests.helpers.processes import PgProxy
from tests.helpers.requests import eventually, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")
CLIENT_DEADLINE_S = 3.0
ENDS_WITHIN_S = 4.0
GAVE_UP = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
DATABASE_METHODS = ("GetDefinition", "SetPreferences", "GetEffectivePreferences")
CEILING_S = 2.0


@contextlib.asynccontextmanager
async def behind_proxy(
    server_url: str, fresh_database: Any, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[App, PgProxy, preferences_pb2_grpc.PreferencesServiceStub, grpc.aio.Channel]]:
    """A server whose PostgreSQL connections all pass through a proxy the test can hang."""
    database = urlparse(await fresh_database()).path.lstrip("/")
    proxy = PgProxy(server_url)
    await proxy.start()
    settings = make_settings(proxy.url(database), tmp_path, **overrides)
    try:
        async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            try:
                yield app, proxy, preferences_pb2_grpc.PreferencesServiceStub(channel), channel
            finally:
                proxy.thaw()
    finally:
        await proxy.stop()


def database_calls(
    stub: preferences_pb2_grpc.PreferencesServiceStub, timeout: float | None
) -> list[Callable[[], Awaitable[Any]]]:
    """One call of each kind that needs PostgreSQL: a definition, a write, an uncached read."""
    uid = unique("u")
    return [
        lambda: stub.GetDefinition(
            preferences_pb2.GetDefinitionRequest(key="display.theme"), metadata=ADMIN, timeout=timeout
        ),
        lambda: stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN, timeout=timeout),
        lambda: stub.GetEffectivePreferences(
            preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u"))),
            metadata=ADMIN,
            timeout=timeout,
        ),
    ]


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, grpc.StatusCode, str]:
    """(seconds, status code, ErrorInfo reason) of one call."""
    started = time.monotonic()
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        # A deadline the client itself enforced carries no ErrorInfo.
        return time.monotonic() - started, error.code(), from_rpc_error(error).reason
    return time.monotonic() - started, grpc.StatusCode.OK, ""


def ended_calls(samples: dict[str, float], codes: set[grpc.StatusCode]) -> float:
    """Calls of the database methods the server has finished with one of `codes`."""
    return sum(
        samples.get(
            f"prefd_rpc_calls_total{{code={code.name},method={method},service=prefd.v1.PreferencesService}}", 0.0
        )
        for method in DATABASE_METHODS
        for code in codes
    )


async def assert_recovered(stub: preferences_pb2_grpc.PreferencesServiceStub) -> None:
    """Every kind of database call succeeds again (same server, no restart)."""
    for call in database_calls(stub, timeout=10):
        await call()


async def test_calls_on_a_hung_database_end_by_their_deadline(server_url, fresh_database, tmp_path) -> None:
    # The health monitor checks at start and then not for an hour, so the breaker stays closed and
    # every call below reaches the hung database: only the deadline can end it.
    async with behind_proxy(
        server_url,
        fresh_database,
        tmp_path,
        health_interval_s=3600,
        health_timeout_s=3600,
        metrics_port=0,
        metrics_host="127.0.0.1",
        db_pool_min=10,
        db_pool_max=10,
    ) as (app, proxy, stub, _):
        before = await asyncio.to_thread(scrape, app.metrics_port)
        proxy.freeze()
        started = time.monotonic()
        # 30 calls, 10 of each kind, against a pool of 10 open connections: 10 calls hold one to the
        # hung server, the rest wait for one.
        calls = [call for _ in range(10) for call in database_calls(stub, CLIENT_DEADLINE_S)]
        results = await asyncio.gather(*(timed(call) for call in calls))
        slowest = max(elapsed for elapsed, _, _ in results)
        assert slowest < ENDS_WITHIN_S, results
        assert {code for _, code, _ in results} <= GAVE_UP, results

        # The client's deadline ends its side of the call whatever the server does; the server must
        # also have stopped working on every one of them (the wrapper counts a call when it is over).
        async def server_done() -> bool:
            samples = await asyncio.to_thread(scrape, app.metrics_port)
            return ended_calls(samples, GAVE_UP) - ended_calls(before, GAVE_UP) >= len(calls)

        await eventually(server_done, started + ENDS_WITHIN_S - time.monotonic(), interval_s=0.05)
        assert time.monotonic() - started < ENDS_WITHIN_S
        proxy.thaw()
        await assert_recovered(stub)


async def test_a_call_without_a_deadline_ends_at_the_server_ceiling(server_url, fresh_database, tmp_path) -> None:
    async with behind_proxy(
        server_url,
        fresh_database,
        tmp_path,
        call_timeout_s=CEILING_S,
        health_interval_s=3600,
        health_timeout_s=3600,
    ) as (_, proxy, stub, _channel):
        proxy.freeze()
        # No client deadline: a server that waited for the hung database would hold these for ever.
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(timed(call) for call in database_calls(stub, timeout=None)))
        for elapsed, code, reason in results:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, results
            assert reason == "DEADLINE_EXCEEDED"
            assert CEILING_S <= elapsed < CEILING_S + 1, results
        proxy.thaw()
        await assert_recovered(stub)


async def test_with_the_database_known_down_calls_fail_fast_and_recover(server_url, fresh_database, tmp_path) -> None:
    async with behind_proxy(server_url, fresh_database, tmp_path) as (_, proxy, stub, channel):
        cached = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
        warm = await stub.GetEffectivePreferences(cached, metadata=ADMIN)
        health = health_pb2_grpc.HealthStub(channel)
        stream = health.Watch(health_pb2.HealthCheckRequest(service="prefd.v1.PreferencesService"))
        await next_status(stream, SERVING, 5)
        proxy.freeze()
        await next_status(stream, NOT_SERVING, 5)

        # Every call that needs PostgreSQL fails at once, long before its deadline.
        calls = [call for _ in range(10) for call in database_calls(stub, CLIENT_DEADLINE_S)]
        results = await asyncio.gather(*(timed(call) for call in calls))
        assert {(code, reason) for _, code, reason in results} == {
            (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        }, results
        assert max(elapsed for elapsed, _, _ in results) < 0.5, results
        # A read the cache answers does not need PostgreSQL and is still served.
        assert await stub.GetEffectivePreferences(cached, metadata=ADMIN, timeout=1) == warm

        proxy.thaw()
        await next_status(stream, SERVING, 5)
        await assert_recovered(stub)
        stream.cancel()


async def test_a_watch_outlives_the_call_ceiling(server_url, fresh_database, tmp_path) -> None:
    async with behind_proxy(
        server_url, fresh_database, tmp_path, call_timeout_s=CEILING_S, watch_progress_interval_s=0.25
    ) as (_, _proxy, stub, _channel):
        uid = unique("u")
        watch = stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=uid)), metadata=ADMIN
        )
        started = time.monotonic()
        await watch.read()
        async with asyncio.timeout(10):
            # Progress bookmarks mark time passing on the stream, past the unary ceiling.
            while time.monotonic() - started <= CEILING_S + 0.5:
                assert (await watch.read()).HasField("progress")
        await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN, timeout=5)
        async with asyncio.timeout(5):
            while not (reply := await watch.read()).HasField("change"):
                assert reply.HasField("progress")
        assert reply.change.key == "display.theme"
        watch.cancel()
