"""SetPreferences, DeletePreferences, ResetPreferences, ListPreferences over real gRPC."""

from __future__ import annotations

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2
from tests.helpers.auth import auth, unique
from tests.helpers.requests import GLOBAL, error_reason, field_violations, org, py, set_request, tv, user

ADMIN = auth("admin")


async def changes_count(db, scope_id: str) -> int:
    return await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", scope_id)


async def test_set_returns_changes_and_effective_values(stub, db):
    uid = unique("u")
    reply = await stub.SetPreferences(
        set_request(user(uid), {"display.theme": "dark", "display.items_per_page": 50}, reason="prefers dark"),
        metadata=ADMIN,
    )
    assert {c.key: (py(c.new_value), c.old_version, c.new_version) for c in reply.changes} == {
        "display.theme": ("dark", 0, 1),
        "display.items_per_page": (50, 0, 1),
    }
    assert {e.key: py(e.value) for e in reply.effective_values} == {
        "display.theme": "dark",
        "display.items_per_page": 50,
    }
    assert all(e.provenance.layer == common_pb2.LAYER_USER for e in reply.effective_values)
    rows = await db.fetch(
        "SELECT key, old_value, new_value, version, actor, reason, request_id, peer, user_agent, xid "
        "FROM changes WHERE scope_id = $1 ORDER BY key",
        uid,
    )
    assert [(r["key"], r["old_value"], r["new_value"], r["version"]) for r in rows] == [
        ("display.items_per_page", None, 50, 1),
        ("display.theme", None, "dark", 1),
    ]
    assert {r["actor"] for r in rows} == {"ops"}
    assert {r["reason"] for r in rows} == {"prefers dark"}
    assert all(r["request_id"] and r["peer"] and "grpc" in r["user_agent"] for r in rows)
    assert len({r["xid"] for r in rows}) == 1  # one transaction


async def test_versions_grow_by_one_per_write_and_across_removal(stub):
    uid = unique("u")
    for expected, theme in [(1, "dark"), (2, "light"), (3, "dark")]:
        reply = await stub.SetPreferences(set_request(user(uid), {"display.theme": theme}), metadata=ADMIN)
        assert reply.changes[0].new_version == expected
    removed = await stub.DeletePreferences(
        preferences_pb2.DeletePreferencesRequest(scope=user(uid), keys=["display.theme"]), metadata=ADMIN
    )
    assert (removed.changes[0].new_version, removed.changes[0].HasField("new_value")) == (4, False)
    again = await stub.SetPreferences(set_request(user(uid), {"display.theme": "light"}), metadata=ADMIN)
    assert again.changes[0].new_version == 5


async def test_writing_the_same_value_changes_nothing(stub, db):
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    reply = await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    assert list(reply.changes) == []
    assert await changes_count(db, uid) == 1


async def test_multi_key_write_is_all_or_nothing(stub, db):
    uid = unique("u")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(
            set_request(user(uid), {"display.theme": "dark", "display.items_per_page": 100000}), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == ["writes[1].value"]
    assert await db.fetchval("SELECT count(*) FROM preference_values WHERE scope_id = $1", uid) == 0
    assert await changes_count(db, uid) == 0


async def test_compare_and_set(stub, db):
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    ok = preferences_pb2.SetPreferencesRequest(
        scope=user(uid),
        writes=[
            preferences_pb2.PreferenceWrite(key="display.theme", value=tv("light"), expected_version=1),
            preferences_pb2.PreferenceWrite(key="locale.language", value=tv("de"), expected_version=0),
        ],
    )
    assert len((await stub.SetPreferences(ok, metadata=ADMIN)).changes) == 2
    stale = preferences_pb2.SetPreferencesRequest(
        scope=user(uid),
        writes=[
            preferences_pb2.PreferenceWrite(key="locale.timezone", value=tv("Europe/Paris")),
            preferences_pb2.PreferenceWrite(key="display.theme", value=tv("system"), expected_version=1),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(stale, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "VERSION_CONFLICT"
    assert "display.theme" in err.value.details() and "found 2" in err.value.details()
    assert await changes_count(db, uid) == 3  # the timezone write was not applied either


async def test_dry_run_returns_diff_and_writes_nothing(stub, db):
    oid, uid = unique("o"), unique("u")
    await stub.SetPreferences(set_request(org(oid), {"display.theme": "dark"}), metadata=ADMIN)
    reply = await stub.SetPreferences(
        set_request(user(uid), {"display.items_per_page": 10}, dry_run=True, org_id=oid), metadata=ADMIN
    )
    assert reply.dry_run
    assert [(c.key, py(c.new_value), c.new_version) for c in reply.changes] == [("display.items_per_page", 10, 1)]
    assert [(e.key, py(e.value), e.provenance.layer) for e in reply.effective_values] == [
        ("display.items_per_page", 10, common_pb2.LAYER_USER)
    ]
    assert await db.fetchval("SELECT count(*) FROM preference_values WHERE scope_id = $1", uid) == 0
    assert await changes_count(db, uid) == 0


async def test_cross_field_rules_use_effective_values_of_the_scope(stub, db):
    oid, uid = unique("o"), unique("u")
    # The org raises minimumAcceptable to 6 (flagging default 6 still >= 6).
    await stub.SetPreferences(set_request(org(oid), {"ui.qualityThresholds.minimumAcceptable": 6.0}), metadata=ADMIN)
    # A user of that org lowering flagging below the org's minimum breaks the rule...
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(
            set_request(user(uid), {"ui.qualityThresholds.flagging": 5.0}, org_id=oid), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "autoApproval >= flagging >= minimumAcceptable" in field_violations(err.value)["writes[0].value"]
    # ...while the same write for a user without that org is fine.
    ok = await stub.SetPreferences(
        set_request(user(unique("u")), {"ui.qualityThresholds.flagging": 5.0}), metadata=ADMIN
    )
    assert len(ok.changes) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(
            set_request(
                user(uid), {"ui.defaultFilters.qualityRange.min": 9.0, "ui.defaultFilters.qualityRange.max": 3.0}
            ),
            metadata=ADMIN,
        )
    assert "writes[0].value" in field_violations(err.value)
    assert await changes_count(db, uid) == 0


async def test_delete_makes_the_key_inherit_again(stub):
    oid, uid = unique("o"), unique("u")
    subject = common_pb2.Subject(user_id=uid, org_id=oid)
    await stub.SetPreferences(set_request(org(oid), {"display.theme": "system"}), metadata=ADMIN)
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    reply = await stub.DeletePreferences(
        preferences_pb2.DeletePreferencesRequest(scope=user(uid), keys=["display.theme", "locale.language"]),
        metadata=ADMIN,
    )
    assert [(c.key, py(c.old_value)) for c in reply.changes] == [("display.theme", "dark")]
    effective = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=["display.theme"]), metadata=ADMIN
    )
    assert [(v.key, py(v.value), v.provenance.layer) for v in effective.values] == [
        ("display.theme", "system", common_pb2.LAYER_ORG)
    ]


async def test_reset_whole_scope_or_one_category(stub, db):
    uid = unique("u")
    values = {"display.theme": "dark", "display.items_per_page": 10, "locale.language": "fr"}
    await stub.SetPreferences(set_request(user(uid), values), metadata=ADMIN)
    reply = await stub.ResetPreferences(
        preferences_pb2.ResetPreferencesRequest(scope=user(uid), category="display", reason="reset display"),
        metadata=ADMIN,
    )
    assert sorted(c.key for c in reply.changes) == ["display.items_per_page", "display.theme"]
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=user(uid)), metadata=ADMIN)
    assert [p.key for p in listed.preferences] == ["locale.language"]
    reply = await stub.ResetPreferences(preferences_pb2.ResetPreferencesRequest(scope=user(uid)), metadata=ADMIN)
    assert [c.key for c in reply.changes] == ["locale.language"]
    assert await db.fetchval("SELECT count(*) FROM preference_values WHERE scope_id=$1 AND value IS NOT NULL", uid) == 0
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id=$1 AND reason='reset display'", uid) == 2


async def test_list_preferences_pages_with_tokens_bound_to_the_query(stub):
    uid = unique("u")
    keys = ["behavior.auto_save", "display.theme", "display.items_per_page", "locale.language", "locale.timezone"]
    values = {
        "behavior.auto_save": False,
        "display.theme": "dark",
        "display.items_per_page": 10,
        "locale.language": "fr",
        "locale.timezone": "Europe/Paris",
    }
    await stub.SetPreferences(set_request(user(uid), values), metadata=ADMIN)
    seen, token = [], ""
    while True:
        page = await stub.ListPreferences(
            preferences_pb2.ListPreferencesRequest(scope=user(uid), page_size=2, page_token=token), metadata=ADMIN
        )
        seen += [p.key for p in page.preferences]
        assert page.cursor.token
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(keys)
    first = await stub.ListPreferences(
        preferences_pb2.ListPreferencesRequest(scope=user(uid), page_size=2), metadata=ADMIN
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListPreferences(
            preferences_pb2.ListPreferencesRequest(
                scope=user(unique("u")), page_size=2, page_token=first.next_page_token
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(err.value)


async def test_global_scope_is_read_by_everyone(stub):
    key = f"{unique('g')}.flag"
    await stub.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(
            definition=preferences_pb2.Definition(
                key=key, category="tests", type=common_pb2.VALUE_TYPE_BOOL, default_value=tv(False)
            )
        ),
        metadata=ADMIN,
    )
    await stub.SetPreferences(set_request(GLOBAL, {key: True}), metadata=ADMIN)
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=unique("u"), org_id=unique("o")), key_prefixes=[key]
        ),
        metadata=ADMIN,
    )
    assert [(v.key, py(v.value), v.provenance.layer) for v in reply.values] == [(key, True, common_pb2.LAYER_GLOBAL)]
