"""prefd.client's live views against the real server: equal to GetEffectivePreferences under
concurrent writes, no update lost across a server kill and restart, compaction and erasure answered
by a re-snapshot, the blocking client from several threads, and typed errors at once for bad input.
Against a scripted server: a watch the server ends with CANCELLED is resumed from the cursor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from prefd.client import AsyncPrefdClient, Backoff, KeyChange, PrefdClient, PrefdError, StaleViewError
from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import audit_pb2, common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.aiconfig import SMALL_BUDGET, create_config, usage
from tests.helpers.auth import auth, token, unique
from tests.helpers.processes import free_port, prefd_process, purge
from tests.helpers.requests import eventually, py, set_request, tv, user
from tests.helpers.settings import make_settings, process_env

ADMIN = auth("admin")
FAST = Backoff(initial_s=0.05, max_s=0.3)


def org(org_id: str) -> common_pb2.Scope:
    return common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=org_id)


async def truth(stub: preferences_pb2_grpc.PreferencesServiceStub, uid: str, oid: str = "") -> dict[str, Any]:
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid, org_id=oid)),
        metadata=ADMIN,
    )
    return {v.key: py(v.value) for v in reply.values}


class Recorder:
    """Collects on_change calls and wakes waiters."""

    def __init__(self) -> None:
        self.changes: list[KeyChange] = []
        self.changed = asyncio.Event()

    def __call__(self, changes: list[KeyChange]) -> None:
        self.changes.extend(changes)
        self.changed.set()

    def values_of(self, key: str) -> list[Any]:
        return [c.new for c in self.changes if c.key == key]


async def test_a_view_equals_the_server_under_concurrent_writes(app: App, stub) -> None:
    uid, oid = unique("u"), unique("o")
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token=token("admin")) as client:
        view = await client.preferences(uid, oid)
        recorder = Recorder()
        user_versions: list[int] = []

        def watch_versions(changes: list[KeyChange]) -> None:
            for change in changes:
                source = view.provenance(change.key)
                if (
                    change.key == "display.items_per_page"
                    and source
                    and source.scope.kind == common_pb2.SCOPE_KIND_USER
                ):
                    user_versions.append(source.version)

        view.on_change(recorder)
        view.on_change(watch_versions)
        assert view.as_flat_dict() == await truth(stub, uid, oid)

        async def writer(scope: common_pb2.Scope, key: str, values: list[Any]) -> None:
            for n, value in enumerate(values):
                if n % 5 == 4:
                    await stub.DeletePreferences(
                        preferences_pb2.DeletePreferencesRequest(scope=scope, keys=[key]), metadata=ADMIN
                    )
                else:
                    await stub.SetPreferences(set_request(scope, {key: value}), metadata=ADMIN)

        themes = ["dark", "light", "system"] * 5
        await asyncio.gather(
            writer(user(uid), "display.items_per_page", [10 + n for n in range(15)]),
            writer(org(oid), "display.items_per_page", [100 + n for n in range(15)]),
            writer(user(uid), "display.theme", themes),
            writer(org(oid), "display.theme", themes[::-1]),
        )
        expected = await truth(stub, uid, oid)

        async def converged() -> bool:
            return view.as_flat_dict() == expected

        await eventually(converged, 10)
        assert view.as_dict()["display"]["items_per_page"] == expected["display.items_per_page"]
        assert recorder.changes and not view.stale and view.snapshots == 1
        assert user_versions == sorted(user_versions) and len(set(user_versions)) == len(user_versions)
        assert view.cursor


def _env(url: str, port: int, tmp_path: Path) -> dict[str, str]:
    return process_env(url, port, PREFD_DATA_DIR=str(tmp_path / "served"))


async def _until(check: Callable[[], bool], deadline_s: float) -> None:
    async def holds() -> bool:
        return check()

    await eventually(holds, deadline_s)


async def _outage_and_restart(
    fresh_database: Any, tmp_path: Path, during_outage: Callable[[str], Any]
) -> AsyncIterator[tuple[Any, Recorder, dict[str, Any]]]:
    """A view on a prefd process that is killed, then restarted on the same port after writes
    (and whatever `during_outage` does) went to another server on the same database."""
    url = await fresh_database()
    port = free_port()
    uid = unique("u")
    env = _env(url, port, tmp_path)
    async with (
        App(make_settings(url, tmp_path / "writer")) as writer_app,
        grpc.aio.insecure_channel(f"127.0.0.1:{writer_app.port}") as channel,
    ):
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 10}), metadata=ADMIN)
        client = AsyncPrefdClient(f"127.0.0.1:{port}", token=token("admin"), timeout_s=2)
        try:
            async with prefd_process(env) as (proc, _, _):
                view = await client.preferences(uid, grace_s=0.5, backoff=FAST)
                recorder = Recorder()
                view.on_change(recorder)
                await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": 11}), metadata=ADMIN)
                await _until(lambda: view.get("display.items_per_page") == 11, 10)
                proc.kill()
                await proc.wait()
            for n in range(12, 17):
                await stub.SetPreferences(set_request(user(uid), {"display.items_per_page": n}), metadata=ADMIN)
            await during_outage(url)
            await _until(lambda: view.stale, 5)
            assert view.get("display.items_per_page") == 11  # the last known value is still served
            async with prefd_process(env):
                # A write after the restart comes after every replayed change in the feed: once the view
                # has it, it has had them all (each replayed change carries the key's value now, so the
                # value alone reaches 16 with the first of them).
                await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
                await _until(lambda: view.get("display.theme") == "dark" and not view.stale, 20)
                yield view, recorder, await truth(stub, uid)
        finally:
            await client.close()


async def test_no_update_is_lost_across_a_server_kill_and_restart(fresh_database, tmp_path) -> None:
    async def nothing(url: str) -> None:
        return None

    async for view, recorder, expected in _outage_and_restart(fresh_database, tmp_path, nothing):
        # Every change made while the server was down arrives from the resumed cursor (each carries
        # the key's effective value now, so callbacks see 11 -> 16 once).
        assert view.changes_applied == 7  # 11, then 12..16 replayed, then the theme written after the restart
        assert recorder.values_of("display.items_per_page") == [11, 16]
        assert view.as_flat_dict() == expected
        assert view.snapshots == 1 and view.reconnects >= 1


async def test_compaction_during_an_outage_forces_a_resnapshot_that_converges(fresh_database, tmp_path) -> None:
    async for view, recorder, expected in _outage_and_restart(fresh_database, tmp_path, purge):
        assert view.snapshots == 2  # the resumed cursor was compacted away
        assert view.as_flat_dict() == expected
        assert recorder.values_of("display.items_per_page")[-1] == 16


async def test_an_erased_users_view_resnapshots_and_follows_the_versions_that_start_again(app: App, stub) -> None:
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token=token("admin")) as client:
        view = await client.preferences(uid)
        recorder = Recorder()
        view.on_change(recorder)
        assert view.provenance("display.theme").version == 1  # type: ignore[union-attr]

        await client.erase_user_data(audit_pb2.EraseUserDataRequest(user_id=uid, reason="the user asked"))
        await _until(lambda: view.get("display.theme") == "light", 10)
        assert view.provenance("display.theme").layer == common_pb2.LAYER_DEFAULT  # type: ignore[union-attr]
        # The user's next override is version 1 again: the view applies it, not skips it as already seen.
        written = await stub.SetPreferences(set_request(user(uid), {"display.theme": "system"}), metadata=ADMIN)
        assert written.changes[0].new_version == 1
        await _until(lambda: view.get("display.theme") == "system", 10)
        assert recorder.values_of("display.theme") == ["light", "system"]
        assert view.snapshots == 2  # the erasure is answered by a re-snapshot
        assert view.as_flat_dict() == await truth(stub, uid)


async def test_a_watch_the_server_ends_with_cancelled_is_resumed_from_the_cursor() -> None:
    theme = "display.theme"
    scope = user("alice")

    def effective(value: str, version: int) -> preferences_pb2.EffectiveValue:
        source = common_pb2.Provenance(layer=common_pb2.LAYER_USER, scope=scope, version=version)
        return preferences_pb2.EffectiveValue(key=theme, value=tv(value), provenance=source)

    def change(value: str, version: int, cursor: str) -> preferences_pb2.WatchPreferencesResponse:
        event = preferences_pb2.ChangeEvent(
            kind=common_pb2.CHANGE_KIND_PREFERENCE,
            scope=scope,
            key=theme,
            version=version,
            new_value=tv(value),
            cursor=common_pb2.Cursor(token=cursor),
            effective=effective(value, version),
        )
        return preferences_pb2.WatchPreferencesResponse(change=event)

    started = preferences_pb2.WatchPreferencesResponse(started=common_pb2.WatchStarted())
    cursors: list[str] = []
    listening = asyncio.Event()  # the first change waits for the test's callback on the view

    class Scripted(preferences_pb2_grpc.PreferencesServiceServicer):
        """A snapshot, then: a watch ended with CANCELLED after a change, one refused with CANCELLED
        before it started (as a busy server does), and one that stays open after another change."""

        async def GetEffectivePreferences(self, request: Any, context: Any) -> Any:
            return preferences_pb2.GetEffectivePreferencesResponse(
                values=[effective("light", 1)], cursor=common_pb2.Cursor(token="snapshot")
            )

        async def WatchPreferences(self, request: Any, context: Any) -> AsyncIterator[Any]:
            cursors.append(request.start_cursor.token)
            if len(cursors) == 1:
                yield started
                await listening.wait()
                yield change("dark", 2, "c1")
                await context.abort(grpc.StatusCode.CANCELLED, "the server ended the watch")
            elif len(cursors) == 2:
                await context.abort(grpc.StatusCode.CANCELLED, "the server refused the watch")
            else:
                yield started
                yield change("system", 3, "c2")
                await asyncio.Future()  # open until the client goes away

    server = grpc.aio.server()
    preferences_pb2_grpc.add_PreferencesServiceServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncPrefdClient(f"127.0.0.1:{port}", token="t", timeout_s=2) as client:
            view = await client.preferences("alice", backoff=Backoff(initial_s=0.01, max_s=0.05))
            recorder = Recorder()
            view.on_change(recorder)
            listening.set()
            await _until(lambda: view.get(theme) == "system", 10)
            assert recorder.values_of(theme) == ["dark", "system"]
            assert cursors == ["snapshot", "c1", "c1"]
            assert view.reconnects == 2 and view.snapshots == 1 and view.cursor == "c2" and not view.stale
            assert view.last_error is not None and view.last_error.code == grpc.StatusCode.CANCELLED
    finally:
        await server.stop(None)


async def test_a_stale_view_can_be_told_to_raise(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    port = free_port()
    client = AsyncPrefdClient(f"127.0.0.1:{port}", token=token("admin"), timeout_s=2)
    try:
        async with prefd_process(_env(url, port, tmp_path)) as (proc, _, _):
            view = await client.preferences(unique("u"), grace_s=0.3, raise_when_stale=True, backoff=FAST)
            assert view.get("display.theme") == "light"
            proc.kill()
            await proc.wait()
        await _until(lambda: view.stale, 5)
        with pytest.raises(StaleViewError):
            view.get("display.theme")
    finally:
        await client.close()


async def test_the_ai_config_view_follows_changes_and_budget_events(app: App, ai_stub) -> None:
    uid = unique("u")
    config = await create_config(ai_stub, user_id=uid, values={**SMALL_BUDGET, "model.temperature": 0.2})
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token=token("admin")) as client:
        view = await client.ai_config(uid)
        assert view.configuration.model.temperature == pytest.approx(0.2)
        assert view.provenance("model.temperature").config_id == config.id  # type: ignore[union-attr]
        configurations: list[ai.AIConfiguration] = []
        crossings: list[ai.BudgetThresholdCrossed] = []
        view.on_change(configurations.append)
        view.on_budget(crossings.append)
        await client.update_ai_config(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(
                    id=config.id, configuration=ai.AIConfiguration(model=ai.ModelConfiguration(temperature=0.7))
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["configuration.model.temperature"]),
            )
        )
        await _until(lambda: bool(configurations), 10)
        assert view.configuration.model.temperature == pytest.approx(0.7)
        service = PrefdClient(f"127.0.0.1:{app.port}", token=token("service", "worker"))
        try:
            for n in range(40):
                reply = await asyncio.to_thread(service.record_usage, usage(uid, unique(f"r{n}-")))
                if reply.crossed:
                    break
        finally:
            await asyncio.to_thread(service.close)
        await _until(lambda: bool(crossings), 10)
        assert crossings[0].user_id == uid and crossings[0].threshold == pytest.approx(0.5)


async def test_the_blocking_client_from_several_threads(app: App) -> None:
    # The server runs on this test's event loop, so the blocking client runs in threads.
    await asyncio.to_thread(_blocking_scenario, app.port)


def _blocking_scenario(port: int) -> None:
    uids = [unique("u") for _ in range(4)]
    errors: list[BaseException] = []
    with PrefdClient(f"127.0.0.1:{port}", token=token("admin")) as client:
        shared = client.preferences(uids[0])
        reached = threading.Event()
        shared.on_change(lambda _: reached.set() if shared.get("display.items_per_page") == 30 else None)

        def work(uid: str, size: int) -> None:
            try:
                client.set_preferences(set_request(user(uid), {"display.items_per_page": size}))
                reply = client.get_effective_preferences(
                    preferences_pb2.GetEffectivePreferencesRequest(
                        subject=common_pb2.Subject(user_id=uid), key_prefixes=["display.items_per_page"]
                    )
                )
                assert py(reply.values[0].value) == size
                for _ in range(1000):
                    assert shared.get("display.theme") is not None
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(uid, 30 + i)) for i, uid in enumerate(uids)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert reached.wait(10) or shared.get("display.items_per_page") == 30
        with pytest.raises(PrefdError) as err:
            client.get_effective_preferences(
                preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=""))
            )
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_target_token_or_subject_raise_at_once(app: App) -> None:
    started = time.monotonic()
    async with AsyncPrefdClient(f"127.0.0.1:{free_port()}", token=token("admin"), timeout_s=3) as client:
        with pytest.raises(PrefdError) as err:
            await client.preferences("alice")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE  # refused at once, not left to the deadline
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token="not-a-token") as client:
        with pytest.raises(PrefdError) as err:
            await client.preferences("alice")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token=token("user", "mallory")) as client:
        with pytest.raises(PrefdError) as err:
            await client.preferences("alice")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - started < 10
