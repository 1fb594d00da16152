"""WatchPreferences: started, events with effective values, resume, compaction, shutdown, bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.tokens import TokenKey
from tests.helpers.auth import auth, unique
from tests.helpers.processes import purge
from tests.helpers.requests import GLOBAL, error_reason, field_violations, org, py, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


def subject_watch(user_id: str, org_id: str = "", start: str = "", prefixes: tuple[str, ...] = ()) -> Any:
    request = preferences_pb2.WatchPreferencesRequest(
        subject=common_pb2.Subject(user_id=user_id, org_id=org_id), key_prefixes=list(prefixes)
    )
    if start:
        request.start_cursor.token = start
    return request


async def next_change(call: Any, deadline_s: float = 5.0) -> preferences_pb2.ChangeEvent:
    """The next change event on a stream, skipping bookmarks."""
    async with asyncio.timeout(deadline_s):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "stream ended"
            if message.HasField("change"):
                return message.change


async def test_subject_watch_delivers_changes_with_effective_values(stub) -> None:
    uid, oid = unique("u"), unique("o")
    call = stub.WatchPreferences(subject_watch(uid, oid, prefixes=("display.",)), metadata=ADMIN)
    first = await call.read()
    assert first.HasField("started") and first.started.cursor.token
    await stub.SetPreferences(set_request(org(oid), {"display.theme": "system"}), metadata=ADMIN)
    await stub.SetPreferences(
        set_request(user(uid), {"display.theme": "dark", "locale.language": "de"}, org_id=oid), metadata=ADMIN
    )
    await stub.SetPreferences(set_request(user(unique("other")), {"display.theme": "light"}), metadata=ADMIN)
    await stub.SetPreferences(set_request(org(oid), {"display.theme": "light"}), metadata=ADMIN)

    events = [await next_change(call) for _ in range(3)]
    assert [(e.scope.kind, e.key, py(e.new_value), e.version) for e in events] == [
        (common_pb2.SCOPE_KIND_ORG, "display.theme", "system", 1),
        (common_pb2.SCOPE_KIND_USER, "display.theme", "dark", 1),
        (common_pb2.SCOPE_KIND_ORG, "display.theme", "light", 2),
    ]
    assert py(events[2].old_value) == "system" and events[2].actor == "ops"
    # The org's second write does not change what the user sees: the USER layer still wins.
    assert (py(events[2].effective.value), events[2].effective.provenance.layer) == ("dark", common_pb2.LAYER_USER)
    call.cancel()


async def test_resume_from_a_cursor_delivers_exactly_what_was_missed(stub) -> None:
    uid = unique("u")
    call = stub.WatchPreferences(subject_watch(uid), metadata=ADMIN)
    await call.read()
    await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 10}), metadata=ADMIN)
    seen = await next_change(call)
    call.cancel()
    for size in (20, 30, 40):
        await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": size}), metadata=ADMIN)
    resumed = stub.WatchPreferences(subject_watch(uid, start=seen.cursor.token), metadata=ADMIN)
    started = await resumed.read()
    assert started.started.cursor.token == seen.cursor.token
    replay = [await next_change(resumed) for _ in range(3)]
    assert [(py(e.new_value), e.version) for e in replay] == [(20, 2), (30, 3), (40, 4)]
    resumed.cancel()


async def test_snapshot_cursor_then_watch_misses_nothing(stub) -> None:
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    snapshot = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid)), metadata=ADMIN
    )
    assert {v.key: py(v.value) for v in snapshot.values}["display.theme"] == "dark"
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "light"}), metadata=ADMIN)
    call = stub.WatchPreferences(subject_watch(uid, start=snapshot.cursor.token), metadata=ADMIN)
    await call.read()
    # A change already in the snapshot may repeat (version 1); the later one must come.
    versions = []
    while 2 not in versions:
        versions.append((await next_change(call)).version)
    assert versions[-1] == 2
    call.cancel()


async def test_scope_watch_and_bookmarks(stub) -> None:
    oid = unique("o")
    call = stub.WatchPreferences(preferences_pb2.WatchPreferencesRequest(scope=org(oid)), metadata=ADMIN)
    started = await call.read()
    async with asyncio.timeout(5):
        bookmark = await call.read()
    assert bookmark.HasField("progress") and bookmark.progress.cursor.token
    await stub.SetPreferences(set_request(user(unique("u")), {"display.theme": "dark"}), metadata=ADMIN)
    await stub.SetPreferences(set_request(org(oid), {"locale.language": "fr"}), metadata=ADMIN)
    event = await next_change(call)
    assert (event.scope.id, event.key, event.HasField("effective")) == (oid, "locale.language", False)
    assert started.started.cursor.token
    call.cancel()


async def test_writes_are_visible_on_the_same_process_at_once(stub) -> None:
    uid = unique("u")
    request = preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=uid), key_prefixes=["display.theme"]
    )
    for theme in ("dark", "light", "system", "dark"):
        await stub.GetEffectivePreferences(request, metadata=ADMIN)  # warm the cache
        await stub.SetPreferences(set_request(user(uid), {"display.theme": theme}), metadata=ADMIN)
        reply = await stub.GetEffectivePreferences(request, metadata=ADMIN)
        assert py(reply.values[0].value) == theme


async def test_compacted_cursor_gets_an_explicit_answer_and_resnapshot_converges(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    async with App(make_settings(url, tmp_path)) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = preferences_pb2_grpc.PreferencesServiceStub(ch)
        uid = unique("u")
        first = await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 10}), metadata=ADMIN)
        assert first.changes
        old = await stub.GetEffectivePreferences(
            preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid)), metadata=ADMIN
        )
        for size in (20, 30):
            await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": size}), metadata=ADMIN)
        assert (await purge(url)).startswith("removed ")
        call = stub.WatchPreferences(subject_watch(uid, start=old.cursor.token), metadata=ADMIN)
        answer = await call.read()
        assert answer.HasField("compacted") and answer.compacted.oldest_cursor.token
        assert await call.read() is grpc.aio.EOF
        # Re-snapshot, then watch from the new cursor: later writes arrive, nothing is refused.
        fresh = await stub.GetEffectivePreferences(
            preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid)), metadata=ADMIN
        )
        assert {v.key: py(v.value) for v in fresh.values}["display.items_per_page"] == 30
        call = stub.WatchPreferences(subject_watch(uid, start=fresh.cursor.token), metadata=ADMIN)
        assert (await call.read()).HasField("started")
        await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 40}), metadata=ADMIN)
        change = await next_change(call)
        while change.version < 4:
            change = await next_change(call)
        assert (py(change.new_value), change.version) == (40, 4)
        call.cancel()


async def test_shutdown_ends_streams_with_a_resumable_status(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    uid = unique("u")
    async with App(make_settings(url, tmp_path)) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = preferences_pb2_grpc.PreferencesServiceStub(ch)
            call = stub.WatchPreferences(subject_watch(uid), metadata=ADMIN)
            await call.read()
            await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 10}), metadata=ADMIN)
            last = await next_change(call)
            await app.stop(2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(5):
                    while True:
                        message = await call.read()
                        assert message is not grpc.aio.EOF
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(err.value) == "SERVER_STOPPING"
    async with App(make_settings(url, tmp_path)) as second, grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as ch:
        stub = preferences_pb2_grpc.PreferencesServiceStub(ch)
        await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 20}), metadata=ADMIN)
        resumed = stub.WatchPreferences(subject_watch(uid, start=last.cursor.token), metadata=ADMIN)
        await resumed.read()
        assert (py((await next_change(resumed)).new_value)) == 20
        resumed.cancel()


def _foreign_cursor() -> str:
    return FeedCursor(5, 1).encode(TokenKey("another-install", b"another secret"))


@pytest.mark.parametrize(
    ("request_fn", "code", "field"),
    [
        (lambda: subject_watch("u1", start="!!not-a-cursor"), grpc.StatusCode.INVALID_ARGUMENT, "start_cursor"),
        (lambda: subject_watch("u1", start=_foreign_cursor()), grpc.StatusCode.INVALID_ARGUMENT, "start_cursor"),
        (
            lambda: preferences_pb2.WatchPreferencesRequest(scope=common_pb2.Scope(kind=9, id="x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scope.kind",
        ),
        (lambda: subject_watch("u1", prefixes=("x" * 129,)), grpc.StatusCode.INVALID_ARGUMENT, "key_prefixes[0]"),
        (lambda: preferences_pb2.WatchPreferencesRequest(), grpc.StatusCode.INVALID_ARGUMENT, "target"),
    ],
)
async def test_bad_watch_requests_do_not_open_a_stream(stub, request_fn, code, field) -> None:
    call = stub.WatchPreferences(request_fn(), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == code
    assert field in field_violations(err.value)


async def test_a_user_watches_only_itself(stub) -> None:
    alice = unique("alice")
    mine = stub.WatchPreferences(subject_watch(alice), metadata=auth("user", alice))
    assert (await mine.read()).HasField("started")
    mine.cancel()
    for request in (subject_watch(unique("bob")), preferences_pb2.WatchPreferencesRequest(scope=GLOBAL)):
        call = stub.WatchPreferences(request, metadata=auth("user", alice))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
