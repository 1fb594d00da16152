"""AuditService over real gRPC: listings, diffs, rollback, erasure and export."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import asyncpg
import grpc
import pgserver
import pytest
from google.protobuf import json_format, struct_pb2

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2
from prefd_server.app import App
from prefd_server.audit.convert import json_value
from tests.helpers.auth import auth, unique
from tests.helpers.requests import error_reason, field_violations, py, set_request, user

ADMIN = auth("admin")


@pytest.fixture(scope="session")
def audit(channel: grpc.aio.Channel) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel)


async def _set(stub, scope: common_pb2.Scope, key: str, value: object) -> None:
    await stub.SetPreferences(set_request(scope, {key: value}), metadata=ADMIN)


async def _last_change_id(db: asyncpg.Connection) -> int:
    value: int = await db.fetchval("SELECT max(id) FROM changes")
    return value


async def test_list_changes_filters_and_pages_without_gaps_under_concurrent_writes(stub, audit) -> None:
    alice = user(unique("u"))
    for i in range(7):
        await _set(stub, alice, "display.items_per_page", 10 + i)
    request = audit_pb2.ListChangesRequest(
        scope=alice, key_prefix="display.", kinds=[common_pb2.CHANGE_KIND_PREFERENCE], page_size=3
    )
    first = await audit.ListChanges(request, metadata=ADMIN)
    assert len(first.changes) == 3 and first.next_page_token
    # Writes after the first page never show up in its later pages.
    await _set(stub, alice, "display.items_per_page", 99)
    seen = list(first.changes)
    token = first.next_page_token
    while token:
        request.page_token = token
        page = await audit.ListChanges(request, metadata=ADMIN)
        seen += page.changes
        token = page.next_page_token
    assert [c.version for c in seen] == list(range(1, 8))
    assert [json.loads(json.dumps(c.new_value.number_value)) for c in seen] == [10 + i for i in range(7)]
    assert all(c.actor == "ops" and c.scope == alice for c in seen)

    newest = await audit.ListChanges(
        audit_pb2.ListChangesRequest(scope=alice, order=audit_pb2.CHANGE_ORDER_NEWEST_FIRST, page_size=2),
        metadata=ADMIN,
    )
    assert [c.version for c in newest.changes] == [8, 7]

    # A token from another query is refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.ListChanges(
            audit_pb2.ListChangesRequest(scope=alice, page_token=first.next_page_token), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(err.value)


async def test_get_change_and_unknown_id(stub, audit, db) -> None:
    alice = user(unique("u"))
    await _set(stub, alice, "display.theme", "dark")
    change_id = await db.fetchval("SELECT max(id) FROM changes WHERE scope_id = $1 AND key = 'display.theme'", alice.id)
    got = await audit.GetChange(audit_pb2.GetChangeRequest(id=change_id), metadata=ADMIN)
    assert got.change.key == "display.theme" and got.change.new_value.string_value == "dark"
    assert got.change.kind == common_pb2.CHANGE_KIND_PREFERENCE and got.change.cursor.token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.GetChange(audit_pb2.GetChangeRequest(id=change_id + 10_000_000), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(err.value) == "CHANGE_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.GetChange(audit_pb2.GetChangeRequest(id=change_id), metadata=auth("user", alice.id))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_diff_scope_between_two_changes(stub, audit, db) -> None:
    alice = user(unique("u"))
    await _set(stub, alice, "display.theme", "dark")
    await _set(stub, alice, "display.items_per_page", 20)
    start = await _last_change_id(db)
    await _set(stub, alice, "display.theme", "light")
    await stub.DeletePreferences(
        preferences_pb2.DeletePreferencesRequest(scope=alice, keys=["display.items_per_page"]), metadata=ADMIN
    )
    end = await _last_change_id(db)
    await _set(stub, alice, "display.theme", "system")  # after `to`: not in the diff
    diff = await audit.DiffScope(
        audit_pb2.DiffScopeRequest(
            scope=alice, **{"from": audit_pb2.HistoryPoint(change_id=start)}, to=audit_pb2.HistoryPoint(change_id=end)
        ),
        metadata=ADMIN,
    )
    found = {d.key: (json.loads(json.dumps(_v(d.before))), _v(d.after)) for d in diff.diffs}
    assert found == {"display.items_per_page": (20, None), "display.theme": ("dark", "light")}


def _v(value):
    kind = value.WhichOneof("kind")
    return None if kind in (None, "null_value") else getattr(value, kind)


async def test_preview_then_rollback_equals_preview_and_is_marked(stub, audit, db) -> None:
    alice = user(unique("u"))
    await _set(stub, alice, "display.theme", "dark")
    point = await _last_change_id(db)
    await _set(stub, alice, "display.theme", "light")
    await _set(stub, alice, "display.items_per_page", 50)
    target = audit_pb2.RollbackTarget(scopes=[alice], to=audit_pb2.HistoryPoint(change_id=point))
    preview = await audit.PreviewRollback(audit_pb2.PreviewRollbackRequest(target=target), metadata=ADMIN)
    planned = {(c.key, py(c.new_value) if c.HasField("new_value") else None) for c in preview.scopes[0].changes}
    assert planned == {("display.theme", "dark"), ("display.items_per_page", None)}
    before = await db.fetchval("SELECT count(*) FROM changes")
    done = await audit.Rollback(
        audit_pb2.RollbackRequest(target=target, reason="undo", preview_token=preview.preview_token), metadata=ADMIN
    )
    assert {(c.key, py(c.new_value) if c.HasField("new_value") else None) for c in done.scopes[0].changes} == planned
    assert await db.fetchval("SELECT count(*) FROM changes") == before + 2
    marks = await db.fetch(
        "SELECT rollback_of, reason FROM changes WHERE scope_id = $1 ORDER BY id DESC LIMIT 2", alice.id
    )
    assert {(m["rollback_of"], m["reason"]) for m in marks} == {(f"change {point}", "undo")}
    effective = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=alice.id), key_prefixes=["display.theme"]
        ),
        metadata=ADMIN,
    )
    assert py(effective.values[0].value) == "dark"


async def test_stale_preview_writes_nothing(stub, audit, db) -> None:
    alice = user(unique("u"))
    await _set(stub, alice, "display.theme", "dark")
    point = await _last_change_id(db)
    await _set(stub, alice, "display.theme", "light")
    target = audit_pb2.RollbackTarget(scopes=[alice], to=audit_pb2.HistoryPoint(change_id=point))
    preview = await audit.PreviewRollback(audit_pb2.PreviewRollbackRequest(target=target), metadata=ADMIN)
    await _set(stub, alice, "display.items_per_page", 30)  # the state moves
    before = await db.fetchval("SELECT count(*) FROM changes")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.Rollback(
            audit_pb2.RollbackRequest(target=target, reason="undo", preview_token=preview.preview_token),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "ROLLBACK_PREVIEW_STALE"
    assert await db.fetchval("SELECT count(*) FROM changes") == before


async def test_bulk_rollback_is_all_or_nothing(stub, audit, db) -> None:
    good, bad = user(unique("u")), user(unique("u"))
    await _set(stub, good, "display.theme", "dark")
    await _set(stub, bad, "display.items_per_page", 150)
    point = await _last_change_id(db)
    await _set(stub, good, "display.theme", "light")
    await _set(stub, bad, "display.items_per_page", 20)
    # A later definition forbids the old value of `bad`.
    definition = (
        await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="display.items_per_page"), metadata=ADMIN)
    ).definition
    original_max = definition.max_value
    definition.max_value = 100
    await stub.UpdateDefinition(preferences_pb2.UpdateDefinitionRequest(definition=definition), metadata=ADMIN)
    try:
        before = await db.fetchval("SELECT count(*) FROM changes")
        target = audit_pb2.RollbackTarget(scopes=[good, bad], to=audit_pb2.HistoryPoint(change_id=point))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason="bulk undo"), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(err.value)
        assert any(f.startswith("scopes[1].changes") for f in violations), violations
        assert "100" in " ".join(violations.values())
        assert await db.fetchval("SELECT count(*) FROM changes") == before
        value = await db.fetchval(
            "SELECT value FROM preference_values WHERE scope_id = $1 AND key = 'display.theme'", good.id
        )
        assert value == "light"
    finally:
        definition.max_value = original_max
        await stub.UpdateDefinition(preferences_pb2.UpdateDefinitionRequest(definition=definition), metadata=ADMIN)


async def test_rollback_bad_input(stub, audit, db) -> None:
    alice = user(unique("u"))
    await _set(stub, alice, "display.theme", "dark")
    point = await _last_change_id(db)
    target = audit_pb2.RollbackTarget(scopes=[alice], to=audit_pb2.HistoryPoint(change_id=point))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason=" "), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in field_violations(err.value)
    future = audit_pb2.HistoryPoint()
    future.time.FromSeconds(4_000_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.PreviewRollback(
            audit_pb2.PreviewRollbackRequest(target=audit_pb2.RollbackTarget(scopes=[alice], to=future)),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target.to.time" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.PreviewRollback(
            audit_pb2.PreviewRollbackRequest(
                target=audit_pb2.RollbackTarget(scopes=[alice], to=audit_pb2.HistoryPoint(change_id=point + 10**9))
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason="x"), metadata=auth("user", alice.id))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_database_refuses_update_and_delete_of_changes(db) -> None:
    for statement in ("UPDATE changes SET actor = 'mallory'", "DELETE FROM changes", "TRUNCATE changes"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await db.execute(statement)


async def test_erasure_leaves_no_trace_and_tells_watchers(app: App, stub, audit, ai_stub) -> None:
    victim = unique("victim")
    scope = user(victim)
    await _set(stub, scope, "display.theme", "dark")
    await stub.SetPreferences(set_request(scope, {"display.items_per_page": 40}), metadata=auth("user", victim))
    exported = await audit.ExportUserData(
        audit_pb2.ExportUserDataRequest(user_id=victim), metadata=auth("user", victim)
    )
    document = json.loads(exported.json)
    assert document["overrides"]["display.theme"]["value"] == "dark"
    assert document["effective_preferences"]["display.items_per_page"] == 40
    assert len(document["changes"]) == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.ExportUserData(audit_pb2.ExportUserDataRequest(user_id=victim), metadata=auth("user", "other"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    stream = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=victim)), metadata=ADMIN
    )
    first = await stream.read()
    assert first.WhichOneof("message") == "started"
    erased = await audit.EraseUserData(
        audit_pb2.EraseUserDataRequest(user_id=victim, reason="GDPR request"), metadata=ADMIN
    )
    assert erased.erased_now and erased.overrides_deleted == 2 and erased.changes_pseudonymised >= 2
    async with asyncio.timeout(10):
        while True:
            message = await stream.read()
            if message.WhichOneof("message") != "progress":
                break
    assert message.WhichOneof("message") == "erased"
    stream.cancel()

    again = await audit.EraseUserData(audit_pb2.EraseUserDataRequest(user_id=victim, reason="again"), metadata=ADMIN)
    assert not again.erased_now and again.pseudonym == erased.pseudonym

    effective = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=victim), key_prefixes=["display.theme"]
        ),
        metadata=ADMIN,
    )
    assert effective.values[0].provenance.layer == common_pb2.LAYER_DEFAULT

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.PreviewRollback(
            audit_pb2.PreviewRollbackRequest(
                target=audit_pb2.RollbackTarget(scopes=[scope], to=audit_pb2.HistoryPoint(change_id=1))
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(err.value) == "USER_ERASED"

    dump_tool = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    dump = await asyncio.to_thread(
        subprocess.run, [str(dump_tool), "--data-only", app.dsn], capture_output=True, check=True, text=True
    )
    assert erased.pseudonym in dump.stdout
    assert victim not in dump.stdout


async def test_erasure_needs_admin_and_a_reason(audit) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.EraseUserData(audit_pb2.EraseUserDataRequest(user_id="x", reason="r"), metadata=auth("user", "x"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit.EraseUserData(audit_pb2.EraseUserDataRequest(user_id="x"), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in field_violations(err.value)


@pytest.mark.parametrize(
    "document", [None, True, 0, -2.5, "", "x", {}, [], {"a": [1, {"b": None}], "c": "d"}, [1, "a", None, {"x": False}]]
)
def test_change_values_convert_as_json_format_does(document: object) -> None:
    expected = struct_pb2.Value()
    json_format.ParseDict(document, expected)
    assert json_value(document) == expected
