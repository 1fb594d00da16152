"""`prefd serve --workers N`: N processes on one port, each with its own feed reader, one change stream."""

from __future__ import annotations

import asyncio
import re
import signal

import grpc

from prefd.v1 import common_pb2, health_pb2, health_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from tests.helpers.auth import auth, unique
from tests.helpers.processes import prefd_process
from tests.helpers.requests import py, set_request, user
from tests.helpers.settings import SECRET

ADMIN = auth("admin")


async def worker_pid(channel: grpc.aio.Channel) -> str:
    reply = await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
        health_pb2.GetSystemHealthRequest(), metadata=ADMIN, timeout=10
    )
    feed = next(c for c in reply.components if c.name == "change_feed")
    return feed.details["process_id"]


async def test_two_workers_share_a_port_and_see_each_others_writes(fresh_database) -> None:
    url = await fresh_database()
    env = {"DATABASE_URL": url, "PREFD_JWT_SECRET": SECRET, "PREFD_PORT": "0", "PREFD_HOST": "127.0.0.1"}
    async with prefd_process(env, "--workers", "2") as (proc, port, lines):
        # prefd_process keeps reading the output into `lines`: wait there for both workers' lines.
        async with asyncio.timeout(60):
            while len(ready := [line for line in lines if line.startswith("prefd serving on port")]) < 2:
                assert proc.returncode is None, "server exited"
                await asyncio.sleep(0.05)
        assert {re.match(r"prefd serving on port (\d+)", line).group(1) for line in ready} == {str(port)}  # type: ignore[union-attr]

        # Each new connection is hashed to one worker; keep opening until both have answered.
        channels: dict[str, grpc.aio.Channel] = {}
        async with asyncio.timeout(30):
            while len(channels) < 2:
                channel = grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
                pid = await worker_pid(channel)
                if pid in channels:
                    await channel.close()
                else:
                    channels[pid] = channel
        (pid_a, channel_a), (pid_b, channel_b) = channels.items()
        assert pid_a != pid_b
        try:
            uid = unique("u")
            watch = preferences_pb2_grpc.PreferencesServiceStub(channel_b).WatchPreferences(
                preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=uid)), metadata=ADMIN
            )
            assert (await watch.read()).HasField("started")
            await preferences_pb2_grpc.PreferencesServiceStub(channel_a).SetPreferences(
                set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN
            )
            async with asyncio.timeout(5):
                message = await watch.read()
                while not message.HasField("change"):
                    message = await watch.read()
            assert (message.change.key, py(message.change.new_value)) == ("display.theme", "dark")
            watch.cancel()
        finally:
            for channel in channels.values():
                await channel.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
