"""Clients that ping often (the client library pings every 30 s; this one every second) are never sent away."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.settings import make_settings

AGGRESSIVE_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


async def test_frequent_pings_on_a_silent_watch_do_not_earn_a_goaway(database_url, tmp_path) -> None:
    # No bookmarks for a minute: the stream carries no data, so every ping counts against the client.
    settings = make_settings(database_url, tmp_path, watch_progress_interval_s=60)
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=AGGRESSIVE_KEEPALIVE) as channel,
    ):
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        call = stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=unique("u"))),
            metadata=auth("admin"),
        )
        assert (await call.read()).HasField("started")
        # About six pings go by; a server with default ping policy ends the stream (too_many_pings).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(6):
                await call.read()
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        reply = await stub.GetEffectivePreferences(
            preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="x")),
            metadata=auth("admin"),
        )
        assert reply.values
        call.cancel()
