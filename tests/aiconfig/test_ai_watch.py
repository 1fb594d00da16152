"""WatchAIConfig: config_changed for every change in the subject's chain (only there), resume, cursors."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import ai_config_pb2_grpc, common_pb2
from prefd_server.app import App
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.tokens import TokenKey
from tests.helpers.aiconfig import (
    ADMIN,
    config_source,
    configuration,
    create_config,
    delete_quietly,
    flat,
    get_effective,
    provenance_tuple,
)
from tests.helpers.auth import auth, unique
from tests.helpers.processes import purge
from tests.helpers.requests import field_violations
from tests.helpers.settings import make_settings


def watch_request(user_id: str, org_id: str = "", start: str = "") -> ai.WatchAIConfigRequest:
    request = ai.WatchAIConfigRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id))
    if start:
        request.start_cursor.token = start
    return request


async def next_event(call: Any, deadline_s: float = 10) -> ai.WatchAIConfigResponse:
    """The next config_changed or budget message, skipping bookmarks."""
    async with asyncio.timeout(deadline_s):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "stream ended"
            kind = message.WhichOneof("message")
            assert kind not in ("compacted", "started"), kind
            if kind != "progress":
                return message


async def next_change(call: Any) -> ai.AIConfigChanged:
    message = await next_event(call)
    assert message.HasField("config_changed"), message
    return message.config_changed


async def started(call: Any) -> ai.WatchStarted:
    first = await call.read()
    assert first is not grpc.aio.EOF and first.HasField("started"), first
    return first.started


def changed_config(change: ai.AIConfigChanged) -> tuple[Any, ...]:
    return (change.config_id, change.config_name, change.scope.kind, change.scope.id, change.version)


async def test_every_change_in_the_chain_is_delivered_with_the_effective_configuration(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    call = ai_stub.WatchAIConfig(watch_request(uid, oid), metadata=ADMIN)
    assert (await started(call)).cursor.token
    org_config = await create_config(ai_stub, org_id=oid, name="org-a", values={"model.temperature": 0.4})
    change = await next_change(call)
    assert changed_config(change) == (org_config.id, "org-a", common_pb2.SCOPE_KIND_ORG, oid, 1)
    assert change.configuration.model.temperature == 0.4 and change.cursor.token
    assert provenance_tuple(change.provenance["model.temperature"]) == config_source(common_pb2.LAYER_ORG, org_config)
    assert list(change.violations) == []

    # Writes outside the chain (another org, another user) produce nothing: the next message is the user's.
    await create_config(ai_stub, org_id=unique("o"), values={"model.temperature": 0.9})
    await create_config(ai_stub, user_id=unique("u"), values={"model.temperature": 0.9})
    mine = await create_config(ai_stub, user_id=uid, name="mine", values={"model.top_p": 0.3})
    change = await next_change(call)
    assert changed_config(change) == (mine.id, "mine", common_pb2.SCOPE_KIND_USER, uid, 1)
    assert (change.configuration.model.temperature, change.configuration.model.top_p) == (0.4, 0.3)

    updated = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(
            config=ai.AIConfig(id=mine.id, configuration=configuration({"model.temperature": 0.1}))
        ),
        metadata=ADMIN,
    )
    change = await next_change(call)
    assert changed_config(change) == (mine.id, "mine", common_pb2.SCOPE_KIND_USER, uid, 2)
    assert change.configuration.model.temperature == 0.1
    assert provenance_tuple(change.provenance["model.temperature"]) == config_source(
        common_pb2.LAYER_USER, updated.config
    )

    await ai_stub.SetAIConfigActive(ai.SetAIConfigActiveRequest(id=org_config.id, active=False), metadata=ADMIN)
    change = await next_change(call)
    assert changed_config(change) == (org_config.id, "org-a", common_pb2.SCOPE_KIND_ORG, oid, 2)

    await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=mine.id), metadata=ADMIN)
    change = await next_change(call)
    assert changed_config(change) == (mine.id, "mine", common_pb2.SCOPE_KIND_USER, uid, 3)
    # Nothing of the org or the user is left in the chain: the subject resolves like a fresh one.
    baseline = await get_effective(ai_stub, unique("u"))
    assert flat(change.configuration) == flat(baseline.configuration)
    assert not {p.layer for p in change.provenance.values()} & {common_pb2.LAYER_ORG, common_pb2.LAYER_USER}
    call.cancel()


async def test_global_changes_reach_every_subject(ai_stub) -> None:
    first = ai_stub.WatchAIConfig(watch_request(unique("u"), unique("o")), metadata=ADMIN)
    second = ai_stub.WatchAIConfig(watch_request(unique("u")), metadata=ADMIN)
    await started(first)
    await started(second)
    glob = await create_config(ai_stub, is_global=True, values={"timeouts.connection_ms": 10001})
    try:
        for call in (first, second):
            change = await next_change(call)
            assert changed_config(change) == (glob.id, glob.name, common_pb2.SCOPE_KIND_GLOBAL, "", 1)
            assert change.configuration.timeouts.connection_ms == 10001
    finally:
        await delete_quietly(ai_stub, glob.id)
    for call in (first, second):
        change = await next_change(call)
        assert (change.config_id, change.version) == (glob.id, 2)
        call.cancel()


async def test_resume_from_a_cursor_replays_what_was_missed(ai_stub) -> None:
    uid = unique("u")
    call = ai_stub.WatchAIConfig(watch_request(uid), metadata=ADMIN)
    await started(call)
    config = await create_config(ai_stub, user_id=uid, values={"model.max_tokens": 10})
    seen = await next_change(call)
    call.cancel()
    for tokens in (20, 30, 40):
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=config.id, configuration=configuration({"model.max_tokens": tokens}))
            ),
            metadata=ADMIN,
        )
    resumed = ai_stub.WatchAIConfig(watch_request(uid, start=seen.cursor.token), metadata=ADMIN)
    await started(resumed)
    replay = [await next_change(resumed) for _ in range(3)]
    assert [change.version for change in replay] == [2, 3, 4]
    assert all(change.config_id == config.id for change in replay)
    # Effective values are computed when sent: the last carries the final state.
    assert replay[-1].configuration.model.max_tokens == 40
    resumed.cancel()


async def test_an_effective_reads_cursor_then_watch_misses_nothing(ai_stub) -> None:
    uid = unique("u")
    config = await create_config(ai_stub, user_id=uid, values={"model.top_p": 0.1})
    snapshot = await get_effective(ai_stub, uid)
    assert snapshot.configuration.model.top_p == 0.1 and snapshot.cursor.token
    await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(config=ai.AIConfig(id=config.id, configuration=configuration({"model.top_p": 0.2}))),
        metadata=ADMIN,
    )
    call = ai_stub.WatchAIConfig(watch_request(uid, start=snapshot.cursor.token), metadata=ADMIN)
    await started(call)
    # A change already in the snapshot may repeat (version 1); the later one must come.
    versions = []
    while 2 not in versions:
        change = await next_change(call)
        versions.append(change.version)
    assert change.configuration.model.top_p == 0.2
    call.cancel()


async def test_idle_streams_get_bookmarks(ai_stub) -> None:
    call = ai_stub.WatchAIConfig(watch_request(unique("u")), metadata=ADMIN)
    first = await started(call)
    async with asyncio.timeout(5):
        bookmark = await call.read()
    assert bookmark.HasField("progress") and bookmark.progress.cursor.token
    assert first.cursor.token
    call.cancel()


def _foreign_cursor() -> str:
    return FeedCursor(5, 1).encode(TokenKey("another-install", b"another secret"))


@pytest.mark.parametrize("start", ["!!not-a-cursor", "abc", "_foreign_"], ids=["garbage", "short", "foreign"])
async def test_a_malformed_cursor_is_invalid_argument(ai_stub, start) -> None:
    token = _foreign_cursor() if start == "_foreign_" else start
    call = ai_stub.WatchAIConfig(watch_request(unique("u"), start=token), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_cursor" in field_violations(err.value)


async def test_a_watch_needs_a_subject(ai_stub) -> None:
    call = ai_stub.WatchAIConfig(ai.WatchAIConfigRequest(), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value)


async def test_a_user_watches_only_itself_and_its_org_comes_from_the_token(ai_stub) -> None:
    alice, oid = unique("alice"), unique("o")
    mine = ai_stub.WatchAIConfig(watch_request(alice), metadata=auth("user", alice, oid))
    await started(mine)
    org_config = await create_config(ai_stub, org_id=oid, values={"model.streaming": True})
    change = await next_change(mine)
    assert (change.config_id, change.configuration.model.streaming) == (org_config.id, True)
    mine.cancel()
    call = ai_stub.WatchAIConfig(watch_request(unique("bob")), metadata=auth("user", alice, oid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_compacted_cursor_gets_an_explicit_answer(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    async with App(make_settings(url, tmp_path)) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = ai_config_pb2_grpc.AIConfigServiceStub(ch)
        uid = unique("u")
        config = await create_config(stub, user_id=uid, values={"model.max_tokens": 10})
        old = await get_effective(stub, uid)
        for tokens in (20, 30):
            await stub.UpdateAIConfig(
                ai.UpdateAIConfigRequest(
                    config=ai.AIConfig(id=config.id, configuration=configuration({"model.max_tokens": tokens}))
                ),
                metadata=ADMIN,
            )
        assert (await purge(url)).startswith("removed ")
        call = stub.WatchAIConfig(watch_request(uid, start=old.cursor.token), metadata=ADMIN)
        answer = await call.read()
        assert answer.HasField("compacted") and answer.compacted.oldest_cursor.token
        assert await call.read() is grpc.aio.EOF
        fresh = await get_effective(stub, uid)
        assert fresh.configuration.model.max_tokens == 30
        call = stub.WatchAIConfig(watch_request(uid, start=fresh.cursor.token), metadata=ADMIN)
        await started(call)
        await stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=config.id, configuration=configuration({"model.max_tokens": 40}))
            ),
            metadata=ADMIN,
        )
        change = await next_change(call)
        while change.version < 4:
            change = await next_change(call)
        assert (change.version, change.configuration.model.max_tokens) == (4, 40)
        call.cancel()
