"""Every service is served through generic handlers, none as registered methods: grpc.aio's server keeps
one call request open per registered method and waits on all of them for every call that arrives, which
with prefd's sixty methods cost more than a third of a cached read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth
from tests.helpers.settings import make_settings


async def test_no_method_is_registered_and_every_service_still_answers(
    fresh_database: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[str] = []

    def record(self: Any, service: str, handlers: Any) -> None:
        registered.append(service)

    monkeypatch.setattr(grpc.aio._server.Server, "add_registered_method_handlers", record)
    async with (
        App(make_settings(await fresh_database(), tmp_path)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="u1"))
        reply = await preferences_pb2_grpc.PreferencesServiceStub(channel).GetEffectivePreferences(
            request, metadata=auth("admin")
        )
        assert reply.cursor.token
    assert registered == []
