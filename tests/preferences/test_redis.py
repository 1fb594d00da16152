"""Redis as L2: used when up; unreachable -> everything still works and health says DEGRADED; back -> used again."""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from prefd.v1 import common_pb2, health_pb2, health_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.processes import RedisServer, free_port
from tests.helpers.requests import eventually, py, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


async def layer_keys(url: str) -> list[bytes]:
    client = aioredis.Redis.from_url(url)
    try:
        return [k async for k in client.scan_iter(match="prefd:*:layer:*")]
    finally:
        await client.aclose()


async def has_layer(url: str, scope_id: str) -> bool:
    return any(scope_id.encode() in key for key in await layer_keys(url))


async def redis_healthy(channel: grpc.aio.Channel) -> bool:
    return (await system_health(channel))["redis"] == health_pb2.HEALTH_STATUS_HEALTHY


async def system_health(channel: grpc.aio.Channel) -> dict[str, int]:
    reply = await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
        health_pb2.GetSystemHealthRequest(), metadata=ADMIN, timeout=10
    )
    return {"overall": reply.status, **{c.name: c.status for c in reply.components}}


async def test_redis_outage_and_recovery(fresh_database, tmp_path) -> None:
    redis_server = RedisServer(free_port())
    await redis_server.start()
    url = await fresh_database()
    uid = unique("u")
    read = preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=uid), key_prefixes=["display.theme"]
    )
    try:
        settings = make_settings(url, tmp_path, redis_url=redis_server.url)
        async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
            assert py((await stub.GetEffectivePreferences(read, metadata=ADMIN)).values[0].value) == "dark"
            await eventually(lambda: has_layer(redis_server.url, uid), 5)  # the L2 fill is asynchronous
            assert (await system_health(channel))["overall"] == health_pb2.HEALTH_STATUS_HEALTHY

            await redis_server.stop()
            await stub.SetPreferences(set_request(user(uid), {"display.theme": "light"}), metadata=ADMIN)
            assert py((await stub.GetEffectivePreferences(read, metadata=ADMIN)).values[0].value) == "light"
            other = unique("u")  # a subject no cache has seen: served from PostgreSQL
            cold = await stub.GetEffectivePreferences(
                preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=other)),
                metadata=ADMIN,
            )
            assert cold.values
            health = await system_health(channel)
            assert (health["overall"], health["redis"], health["postgresql"]) == (
                health_pb2.HEALTH_STATUS_DEGRADED,
                health_pb2.HEALTH_STATUS_DEGRADED,
                health_pb2.HEALTH_STATUS_HEALTHY,
            )
            standard = await grpc_health_pb2_grpc.HealthStub(channel).Check(grpc_health_pb2.HealthCheckRequest())
            assert standard.status == grpc_health_pb2.HealthCheckResponse.SERVING

            await redis_server.start()
            await eventually(lambda: redis_healthy(channel), 1, 0.05)  # healthy again within 1 s
            third = unique("u")
            await stub.GetEffectivePreferences(
                preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=third)),
                metadata=ADMIN,
            )
            await eventually(lambda: has_layer(redis_server.url, third), 5)  # L2 used again, no restart
    finally:
        await redis_server.stop()
