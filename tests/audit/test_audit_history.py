"""AuditService history over real gRPC: gap-free paging under many writers, filters, export of AI
configs, and the retention purge keeping every current value explained."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.aiconfig import create_config
from tests.helpers.auth import auth, unique
from tests.helpers.processes import purge
from tests.helpers.requests import field_violations, set_request, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")
WRITERS = 8


@pytest.fixture(scope="session")
def audit(channel: grpc.aio.Channel) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel)


def _timestamp(value) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def _list_all(audit, request: audit_pb2.ListChangesRequest, metadata=ADMIN) -> list[audit_pb2.AuditChange]:
    seen: list[audit_pb2.AuditChange] = []
    request.page_token = ""
    while True:
        page = await audit.ListChanges(request, metadata=metadata)
        seen += page.changes
        if not page.next_page_token:
            return seen
        request.page_token = page.next_page_token


@pytest.mark.parametrize("order", [audit_pb2.CHANGE_ORDER_OLDEST_FIRST, audit_pb2.CHANGE_ORDER_NEWEST_FIRST])
async def test_paging_is_gap_free_while_many_writers_commit(stub, audit, db, order) -> None:
    """Every page of a listing is a keyset range below the first page's horizon: the whole listing is
    exactly the feed-ordered prefix of the actor's changes that were committed when it started."""
    actor = unique("writer")
    writer_auth = auth("admin", actor)
    users = [user(unique("u")) for _ in range(WRITERS)]

    async def write(scope: common_pb2.Scope, n: int) -> None:
        request = set_request(scope, {"display.items_per_page": 10 + n % 2 * 10})
        await stub.SetPreferences(request, metadata=writer_auth)

    for n in range(3):
        await asyncio.gather(*(write(scope, n) for scope in users))
    acknowledged = {row["id"] for row in await db.fetch("SELECT id FROM changes WHERE actor = $1", actor)}
    assert len(acknowledged) == 3 * WRITERS

    stop = asyncio.Event()
    written = [0] * WRITERS

    async def keep_writing(i: int) -> None:
        while not stop.is_set():
            await write(users[i], written[i] + 1)
            written[i] += 1

    writers = [asyncio.create_task(keep_writing(i)) for i in range(WRITERS)]
    try:
        request = audit_pb2.ListChangesRequest(actor=actor, order=order, page_size=4)
        listed = [change.id for change in await _list_all(audit, request)]
    finally:
        stop.set()
        await asyncio.gather(*writers)

    final = [row["id"] for row in await db.fetch("SELECT id FROM changes WHERE actor = $1 ORDER BY xid, id", actor)]
    in_feed_order = listed if order == audit_pb2.CHANGE_ORDER_OLDEST_FIRST else listed[::-1]
    assert len(set(listed)) == len(listed)
    assert acknowledged <= set(listed)
    assert in_feed_order == final[: len(listed)]
    assert sum(written) > 0 and len(final) == 3 * WRITERS + sum(written)


async def test_filters_by_kind_actor_time_and_key_prefix(stub, audit, ai_stub, db) -> None:
    alice = user(unique("u"))
    first_actor, second_actor = unique("actor"), unique("actor")
    await stub.SetPreferences(set_request(alice, {"display.theme": "dark"}), metadata=auth("admin", first_actor))
    middle = await db.fetchval("SELECT now()")
    await stub.SetPreferences(set_request(alice, {"display.items_per_page": 50}), metadata=auth("admin", second_actor))
    config = await create_config(
        ai_stub, metadata=auth("admin", first_actor), user_id=alice.id, keys={"primary": "sk-live-abcdef123456"}
    )

    async def listed(**filters) -> list[tuple[int, str, str]]:
        changes = await _list_all(audit, audit_pb2.ListChangesRequest(scope=alice, page_size=2, **filters))
        return [(change.kind, change.key, change.actor) for change in changes]

    pref, ai_kind = common_pb2.CHANGE_KIND_PREFERENCE, common_pb2.CHANGE_KIND_AI_CONFIG
    everything = [
        (pref, "display.theme", first_actor),
        (pref, "display.items_per_page", second_actor),
        (ai_kind, f"ai_config/{config.id}", first_actor),
    ]
    assert await listed() == everything
    assert await listed(kinds=[ai_kind]) == everything[2:]
    assert await listed(kinds=[pref, ai_kind]) == everything
    assert await listed(kinds=[common_pb2.CHANGE_KIND_ERASURE]) == []
    assert await listed(actor=first_actor) == [everything[0], everything[2]]
    assert await listed(key_prefix="display.items") == [everything[1]]
    assert await listed(start_time=_timestamp(middle)) == everything[1:]
    assert await listed(end_time=_timestamp(middle)) == everything[:1]

    # The AI config's change row shows the key masked; ListChanges is admin-only.
    ai_change = (await _list_all(audit, audit_pb2.ListChangesRequest(scope=alice, kinds=[ai_kind])))[0]
    assert "sk-live" not in str(ai_change) and "3456" in str(ai_change)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.ListChanges(audit_pb2.ListChangesRequest(scope=alice), metadata=auth("user", alice.id))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    for bad, field in (
        (audit_pb2.ListChangesRequest(kinds=[77]), "kinds[0]"),
        (audit_pb2.ListChangesRequest(start_time=_timestamp(middle), end_time=_timestamp(middle)), "end_time"),
        (audit_pb2.ListChangesRequest(key_prefix="x" * 129), "key_prefix"),
        (audit_pb2.ListChangesRequest(page_token="not-a-token"), "page_token"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await audit.ListChanges(bad, metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(err.value)


async def test_export_holds_overrides_ai_configs_masked_and_history(stub, audit, ai_stub) -> None:
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    config = await create_config(
        ai_stub, user_id=uid, values={"model.temperature": 0.3}, keys={"primary": "sk-export-secret-9876"}
    )
    exported = await audit.ExportUserData(audit_pb2.ExportUserDataRequest(user_id=uid), metadata=ADMIN)
    assert "sk-export-secret" not in exported.json
    document = json.loads(exported.json)
    assert document["user_id"] == uid
    assert document["overrides"]["display.theme"]["value"] == "dark"
    assert document["effective_preferences"]["display.theme"] == "dark"
    assert document["effective_preferences"]["display.items_per_page"] == 25  # the default
    [exported_config] = document["ai_configs"]
    assert exported_config["id"] == config.id
    assert json.dumps(exported_config).count("****9876") >= 1
    assert [(c["kind"], c["key"]) for c in document["changes"]] == [
        ("preference", "display.theme"),
        ("ai_config", f"ai_config/{config.id}"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.ExportUserData(audit_pb2.ExportUserDataRequest(user_id=""), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in field_violations(err.value)


async def test_purge_keeps_what_explains_current_values_and_refuses_points_before_it(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    async with (
        App(make_settings(url, tmp_path)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        conn = await asyncpg.connect(url)
        try:
            alice, acme = user(unique("u")), common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=unique("org"))
            for theme in ("dark", "light", "system"):
                await stub.SetPreferences(set_request(alice, {"display.theme": theme}), metadata=ADMIN)
            await stub.SetPreferences(set_request(alice, {"display.items_per_page": 10}), metadata=ADMIN)
            await stub.DeletePreferences(
                preferences_pb2.DeletePreferencesRequest(scope=alice, keys=["display.items_per_page"]), metadata=ADMIN
            )
            await stub.SetPreferences(set_request(acme, {"display.items_per_page": 30}), metadata=ADMIN)
            early = await conn.fetchrow(
                "SELECT id, created_at FROM changes WHERE scope_id = $1 AND version = 1 AND key = 'display.theme'",
                alice.id,
            )
            latest = await conn.fetchval("SELECT max(id) FROM changes")

            assert (await purge(url)).startswith("removed 3 change rows")  # dark, light, items 10

            # Every current value is explained by a change row with its version and value.
            unexplained = await conn.fetchval(
                """SELECT count(*) FROM preference_values p WHERE NOT EXISTS (
                       SELECT 1 FROM changes c WHERE c.kind = 'preference' AND c.scope_kind = p.scope_kind
                         AND c.scope_id = p.scope_id AND c.key = p.key AND c.version = p.version
                         AND c.new_value IS NOT DISTINCT FROM p.value)"""
            )
            assert unexplained == 0 and await conn.fetchval("SELECT count(*) FROM preference_values") >= 3
            history = await _list_all(audit, audit_pb2.ListChangesRequest(scope=alice))
            assert [(c.key, c.version, c.new_value.WhichOneof("kind")) for c in history] == [
                ("display.theme", 3, "string_value"),
                ("display.items_per_page", 2, "null_value"),
            ]
            # The purge is itself recorded.
            purges = await _list_all(audit, audit_pb2.ListChangesRequest(kinds=[common_pb2.CHANGE_KIND_MAINTENANCE]))
            assert [(c.key, c.new_value.struct_value["removed"], c.actor) for c in purges] == [
                ("changes.purge", 3, "prefd:purge")
            ]

            # Points before the retained history, or in the future, are refused and write nothing.
            rows_before = await conn.fetchval("SELECT count(*) FROM changes")
            future = _timestamp(early["created_at"] + timedelta(days=1))
            for point, field in (
                (audit_pb2.HistoryPoint(change_id=early["id"]), "target.to.change_id"),
                (audit_pb2.HistoryPoint(time=_timestamp(early["created_at"])), "target.to.time"),
                (audit_pb2.HistoryPoint(time=future), "target.to.time"),
            ):
                target = audit_pb2.RollbackTarget(scopes=[alice], to=point)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason="undo"), metadata=ADMIN)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(err.value)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await audit.DiffScope(
                    audit_pb2.DiffScopeRequest(scope=alice, **{"from": audit_pb2.HistoryPoint(change_id=early["id"])}),
                    metadata=ADMIN,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "from.change_id" in field_violations(
                err.value
            )
            assert await conn.fetchval("SELECT count(*) FROM changes") == rows_before

            # A point after the cutoff is still fully reconstructed, from the kept rows.
            await stub.SetPreferences(set_request(alice, {"display.theme": "dark"}), metadata=ADMIN)
            diff = await audit.DiffScope(
                audit_pb2.DiffScopeRequest(scope=alice, **{"from": audit_pb2.HistoryPoint(change_id=latest)}),
                metadata=ADMIN,
            )
            assert [(d.key, d.before.string_value, d.after.string_value) for d in diff.diffs] == [
                ("display.theme", "system", "dark")
            ]
            target = audit_pb2.RollbackTarget(scopes=[alice], to=audit_pb2.HistoryPoint(change_id=latest))
            await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason="undo"), metadata=ADMIN)
            effective = await stub.GetEffectivePreferences(
                preferences_pb2.GetEffectivePreferencesRequest(
                    subject=common_pb2.Subject(user_id=alice.id), key_prefixes=["display.theme"]
                ),
                metadata=ADMIN,
            )
            assert effective.values[0].value.string_value == "system"
        finally:
            await conn.close()
