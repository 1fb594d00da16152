"""grpc.health.v1 statuses and waiting for the next one on a Watch stream."""

from __future__ import annotations

import asyncio
import time

from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def next_status(stream, want: int, deadline_s: float) -> float:
    """Seconds until the Watch stream reports `want`."""
    start = time.monotonic()
    async with asyncio.timeout(deadline_s):
        async for reply in stream:
            if reply.status == want:
                return time.monotonic() - start
    raise AssertionError("stream ended")
