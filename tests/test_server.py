"""The server as operators see it: reflection, grpc.health.v1, database outages, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
from urllib.parse import urlparse

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd.v1 import health_pb2 as prefd_health_pb2
from prefd.v1 import health_pb2_grpc as prefd_health_pb2_grpc
from prefd_server.app import App
from prefd_server.ops.checks import Probe
from tests.helpers.auth import auth, unique
from tests.helpers.health import NOT_SERVING, SERVING, next_status
from tests.helpers.processes import PgProxy, prefd_process
from tests.helpers.requests import set_request, user
from tests.helpers.settings import make_settings, serve_env

# Someone waits on the advisory lock hashtextextended($1, 0) in this connection's database.
# pg_locks shows the cluster; an 8-byte advisory key is split into classid (high) and objid (low).
WAITS_ON_ADVISORY_KEY = """SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)"""


async def test_reflection_lists_and_describes_the_service(app: App) -> None:
    # The reflection client is synchronous; run it off the loop that serves the calls.
    await asyncio.to_thread(_check_reflection, app.port)


def _check_reflection(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"prefd.v1.PreferencesService", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(database)
        service = pool.FindServiceByName("prefd.v1.PreferencesService")
        assert {m.name for m in service.methods} == {
            "CreateDefinition",
            "UpdateDefinition",
            "GetDefinition",
            "ListDefinitions",
            "DeleteDefinition",
            "SetPreferences",
            "DeletePreferences",
            "ResetPreferences",
            "ListPreferences",
            "GetEffectivePreferences",
            "BatchGetEffectivePreferences",
            "WatchPreferences",
        }


async def test_health_needs_no_token_and_reports_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "prefd.v1.PreferencesService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == SERVING


async def test_health_follows_postgresql_reachability(server_url, fresh_database, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="prefd_server.ops.monitor")
    database = urlparse(await fresh_database()).path.lstrip("/")
    proxy = PgProxy(server_url)
    await proxy.start()
    async with App(make_settings(proxy.url(database), tmp_path)) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            stream = health.Watch(health_pb2.HealthCheckRequest(service="prefd.v1.PreferencesService"))
            assert await next_status(stream, SERVING, 5) < 1
            await proxy.stop()
            assert await next_status(stream, NOT_SERVING, 5) < 1
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetEffectivePreferences(
                    preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="u1")),
                    metadata=auth(),
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await proxy.start()
            assert await next_status(stream, SERVING, 5) < 1
            reply = await stub.GetEffectivePreferences(
                preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="u1")),
                metadata=auth(),
            )
            assert reply.values
            stream.cancel()
    await proxy.stop()
    # Reaching the database is routine (INFO, also on every start); losing it is a WARNING.
    transitions = [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "prefd_server.ops.monitor" and record.getMessage().startswith("database ")
    ]
    assert transitions == [
        (logging.INFO, "database reachable"),
        (logging.WARNING, "database unreachable"),
        (logging.INFO, "database reachable"),
    ]


async def test_a_hung_postgresql_never_hangs_health(server_url, fresh_database, tmp_path) -> None:
    """PostgreSQL stops answering without closing anything: each check gives up at its timeout."""
    database = urlparse(await fresh_database()).path.lstrip("/")
    proxy = PgProxy(server_url)
    await proxy.start()
    timeout_s = 0.5
    settings = make_settings(proxy.url(database), tmp_path, health_timeout_s=timeout_s, health_interval_s=0.2)
    async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        system = prefd_health_pb2_grpc.HealthServiceStub(channel)
        stream = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert await next_status(stream, SERVING, 5) < 1
        proxy.freeze()
        assert await next_status(stream, NOT_SERVING, 5) < 1
        started = time.monotonic()
        report = await system.GetSystemHealth(prefd_health_pb2.GetSystemHealthRequest(), metadata=auth(), timeout=10)
        assert time.monotonic() - started < timeout_s + 0.5
        components = {c.name: c for c in report.components}
        assert report.status == prefd_health_pb2.HEALTH_STATUS_UNHEALTHY
        assert components["postgresql"].status == prefd_health_pb2.HEALTH_STATUS_UNHEALTHY
        assert "no answer within" in components["postgresql"].error
        assert components["postgresql"].latency.ToNanoseconds() < (timeout_s + 0.2) * 1e9
        proxy.thaw()
        assert await next_status(stream, SERVING, 5) < 1
        report = await system.GetSystemHealth(prefd_health_pb2.GetSystemHealthRequest(), metadata=auth(), timeout=10)
        assert {c.name: c.status for c in report.components}["postgresql"] == prefd_health_pb2.HEALTH_STATUS_HEALTHY
        stream.cancel()
    await proxy.stop()


async def test_sigterm_lets_in_flight_calls_finish(fresh_database) -> None:
    url = await fresh_database()
    env = serve_env(url, PREFD_GRACE_PERIOD_S="20")
    uid = unique("u")
    async with prefd_process(env) as (proc, port, _lines):
        blocker = await asyncpg.connect(url)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                # Hold the scope's write lock so the write below stays in flight.
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"prefd:USER:{uid}")
                in_flight = asyncio.ensure_future(
                    stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=auth(), timeout=30)
                )
                # The server exposes no "call is waiting" event; poll the lock table under a deadline
                # for a wait on this very lock in this test's database (the server may be shared).
                async with asyncio.timeout(10):
                    while not await blocker.fetchval(WAITS_ON_ADVISORY_KEY, f"prefd:USER:{uid}"):  # noqa: ASYNC110
                        await asyncio.sleep(0.02)  # polling the lock table, bounded by the deadline
                stream = health.Watch(health_pb2.HealthCheckRequest())
                await next_status(stream, SERVING, 5)
                proc.send_signal(signal.SIGTERM)
                await next_status(stream, NOT_SERVING, 5)
                await tx.commit()
                reply = await in_flight
                assert reply.changes[0].new_version == 1
        finally:
            await blocker.close()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    check = await asyncpg.connect(url)
    try:
        assert await check.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", uid) == 1
    finally:
        await check.close()


async def test_embedded_mode_prints_a_working_token_and_grpcurl_line(tmp_path) -> None:
    env = {"DATABASE_URL": "", "PREFD_PORT": "0", "PREFD_HOST": "127.0.0.1", "PREFD_DATA_DIR": str(tmp_path / "d")}
    env_without_db = {k: v for k, v in env.items() if v}
    os.environ.pop("PREFD_JWT_SECRET", None)
    saved = os.environ.pop("DATABASE_URL", None)
    try:
        async with prefd_process(env_without_db, startup_s=120) as (proc, port, lines):
            export = next(line for line in lines if line.startswith("export PREFD_TOKEN="))
            grpcurl_line = next(line for line in lines if line.startswith("grpcurl "))
            assert f"localhost:{port}" in grpcurl_line
            script = f"{export.strip()}\n{grpcurl_line.strip()}\n"
            result = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                script,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PATH": f"{os.path.dirname(os.sys.executable)}:{os.environ['PATH']}"},
            )
            out, err = await result.communicate()
            assert result.returncode == 0, err.decode() + shlex.quote(script)
            assert '"display.theme"' in out.decode() or '"theme"' in out.decode()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                assert await proc.wait() == 0
        assert (tmp_path / "d" / "jwt_secret").stat().st_mode & 0o077 == 0
    finally:
        if saved is not None:
            os.environ["DATABASE_URL"] = saved


async def test_a_hung_check_is_awaited_again_not_started_again() -> None:
    release = asyncio.Event()
    started = 0

    async def check() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "answered"

    probe = Probe(check, abandon_after_s=60)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await probe.run(0.01)
    assert started == 1
    release.set()
    assert await probe.run(1) == "answered"
    release.clear()
    with pytest.raises(TimeoutError):
        await probe.run(0.01)
    assert started == 2  # a finished check is not reused

    stuck = Probe(check, abandon_after_s=0)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await stuck.run(0.01)
    assert started == 4  # past abandon_after_s a hung check is replaced
    release.set()
