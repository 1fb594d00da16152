"""Thousands of watchers opening their streams at once (a fleet reconnecting after a restart) all get
served: none is cancelled for arriving faster than the server picks calls up."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique

SERVICE = auth("service", "reader")
STREAMS = 4000  # past gRPC's default of 3,000 calls waiting to be picked up


async def test_thousands_of_watches_opened_at_once_all_start(app: App) -> None:
    org_id = unique("o")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        calls = [
            stub.WatchPreferences(
                preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=f"u{n}", org_id=org_id)),
                metadata=SERVICE,
            )
            for n in range(STREAMS)
        ]

        async def first(call: Any) -> str:
            try:
                return str((await call.read()).WhichOneof("message"))
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        try:
            async with asyncio.timeout(120):
                outcomes = await asyncio.gather(*(first(call) for call in calls))
        finally:
            for call in calls:
                call.cancel()
    refused = {outcome: outcomes.count(outcome) for outcome in set(outcomes) if outcome != "started"}
    assert not refused, refused
