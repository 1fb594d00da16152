"""grpc.health.v1 status: the whole server and each prefd service SERVING or NOT_SERVING together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from grpc_health.v1 import health, health_pb2


def serving_status(
    servicer: health.aio.HealthServicer, service_names: Sequence[str]
) -> Callable[[bool], Awaitable[None]]:
    """A publisher for HealthMonitor: sets the server ("") and every one of `service_names` to SERVING
    when called with True, NOT_SERVING when called with False."""

    async def publish(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *service_names):
            await servicer.set(name, status)

    return publish
