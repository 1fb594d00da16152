"""A cursor names a position in one installation's feed, in one layout of it: a cursor another installation
issued, or one sealed by this installation for another feed layout, is INVALID_ARGUMENT, never a silent gap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.requests import field_violations, token_key
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


async def refused(stub: preferences_pb2_grpc.PreferencesServiceStub, subject: common_pb2.Subject, token: str) -> Any:
    call = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(subject=subject, start_cursor=common_pb2.Cursor(token=token)),
        metadata=ADMIN,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    return err.value


async def test_cursors_of_another_installation_or_layout_are_refused(fresh_database: Any, tmp_path: Path) -> None:
    url_a, url_b = await fresh_database(), await fresh_database()
    subject = common_pb2.Subject(user_id=unique("u"), org_id=unique("o"))
    async with (
        App(make_settings(url_a, tmp_path / "a")) as a,
        App(make_settings(url_b, tmp_path / "b")) as b,
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as channel_b,
    ):
        stub_a = preferences_pb2_grpc.PreferencesServiceStub(channel_a)
        stub_b = preferences_pb2_grpc.PreferencesServiceStub(channel_b)
        request = preferences_pb2.GetEffectivePreferencesRequest(subject=subject)
        from_a = (await stub_a.GetEffectivePreferences(request, metadata=ADMIN)).cursor.token
        from_b = (await stub_b.GetEffectivePreferences(request, metadata=ADMIN)).cursor.token

        foreign = await refused(stub_b, subject, from_a)
        assert foreign.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "start_cursor" in field_violations(foreign)

        # Sealed with B's own key but naming another layout of the feed (a partitioned one): refused too.
        db = await asyncpg.connect(url_b)
        try:
            key = await token_key(db)
        finally:
            await db.close()
        for payload in (f"c3.{key.installation}.p0:12,p1:7", f"c2.{key.installation}.12", "c2.other.12.0"):
            other_layout = await refused(stub_b, subject, key.seal(payload))
            assert other_layout.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
            assert "start_cursor" in field_violations(other_layout)

        # B's own cursor is accepted.
        call = stub_b.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=subject, start_cursor=common_pb2.Cursor(token=from_b)),
            metadata=ADMIN,
        )
        assert (await call.read()).WhichOneof("message") == "started"
        call.cancel()
