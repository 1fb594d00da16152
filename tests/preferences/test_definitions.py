"""Definition management and the shipped catalog."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.preferences.catalog import load_catalog
from tests.helpers.auth import auth, unique
from tests.helpers.requests import error_reason, field_violations, py, set_request, tv, user

ADMIN = auth("admin")


def int_definition(key: str, **fields) -> preferences_pb2.Definition:
    return preferences_pb2.Definition(
        key=key, category="tests", type=common_pb2.VALUE_TYPE_INT, default_value=tv(5), **fields
    )


async def test_shipped_definitions_are_loaded_from_the_data_file(stub):
    catalog = load_catalog()
    listed, token = [], ""
    while True:
        page = await stub.ListDefinitions(
            preferences_pb2.ListDefinitionsRequest(page_size=40, page_token=token), metadata=ADMIN
        )
        listed += list(page.definitions)
        token = page.next_page_token
        if not token:
            break
    shipped = {d.key for d in catalog.definitions}
    assert shipped <= {d.key for d in listed}
    categories = {d.category for d in catalog.definitions}
    assert {
        "display",
        "locale",
        "behavior",
        "ui",
        "notifications",
        "trading",
        "risk_management",
        "strategy",
        "market_data",
        "performance",
    } <= categories
    rows = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="ui.rowsPerPage"), metadata=ADMIN)
    assert sorted(py(v) for v in rows.definition.allowed_values) == [10, 25, 50, 100]
    theme = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="ui.theme"), metadata=ADMIN)
    assert sorted(py(v) for v in theme.definition.allowed_values) == ["dark", "light", "system"]


async def test_list_definitions_by_category_pages_in_key_order(stub):
    seen, token = [], ""
    while True:
        page = await stub.ListDefinitions(
            preferences_pb2.ListDefinitionsRequest(category="risk_management", page_size=3, page_token=token),
            metadata=ADMIN,
        )
        assert len(page.definitions) <= 3
        seen += [d.key for d in page.definitions]
        token = page.next_page_token
        if not token:
            break
    expected = sorted(d.key for d in load_catalog().definitions if d.category == "risk_management")
    assert seen == expected
    first = await stub.ListDefinitions(
        preferences_pb2.ListDefinitionsRequest(category="risk_management", page_size=3), metadata=ADMIN
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDefinitions(
            preferences_pb2.ListDefinitionsRequest(category="trading", page_size=3, page_token=first.next_page_token),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(err.value)


async def test_create_get_update_delete(stub, db):
    key = f"{unique()}.limit"
    created = await stub.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(definition=int_definition(key, min_value=0, max_value=10)),
        metadata=ADMIN,
    )
    assert (created.definition.version, created.definition.updated_by) == (1, "ops")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateDefinition(
            preferences_pb2.CreateDefinitionRequest(definition=int_definition(key)), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    updated = await stub.UpdateDefinition(
        preferences_pb2.UpdateDefinitionRequest(
            definition=preferences_pb2.Definition(key=key, description="new words", max_value=20),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "max_value"]),
            expected_version=1,
        ),
        metadata=ADMIN,
    )
    assert (updated.definition.description, updated.definition.max_value, updated.definition.version) == (
        "new words",
        20,
        2,
    )
    assert updated.definition.min_value == 0 and py(updated.definition.default_value) == 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateDefinition(
            preferences_pb2.UpdateDefinitionRequest(
                definition=preferences_pb2.Definition(key=key, description="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                expected_version=1,
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    kinds = [
        r["version"]
        for r in await db.fetch("SELECT version FROM changes WHERE kind = 'definition' AND key = $1 ORDER BY id", key)
    ]
    assert kinds == [1, 2]

    await stub.DeleteDefinition(preferences_pb2.DeleteDefinitionRequest(key=key), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key=key), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "DEFINITION_NOT_FOUND"


async def test_update_refused_when_stored_values_would_break_it(stub, db):
    key, uid = f"{unique()}.limit", unique("u")
    await stub.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(definition=int_definition(key, max_value=100)), metadata=ADMIN
    )
    await stub.SetPreferences(set_request(user(uid), {key: 80}), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateDefinition(
            preferences_pb2.UpdateDefinitionRequest(
                definition=preferences_pb2.Definition(key=key, max_value=50),
                update_mask=field_mask_pb2.FieldMask(paths=["max_value"]),
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"USER({uid})" in err.value.details()
    stored = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key=key), metadata=ADMIN)
    assert (stored.definition.max_value, stored.definition.version) == (100, 1)


async def test_delete_refused_while_values_exist_unless_forced(stub, db):
    key, uid = f"{unique()}.limit", unique("u")
    await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=int_definition(key)), metadata=ADMIN)
    await stub.SetPreferences(set_request(user(uid), {key: 7}), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDefinition(preferences_pb2.DeleteDefinitionRequest(key=key), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "DEFINITION_IN_USE"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDefinition(
            preferences_pb2.DeleteDefinitionRequest(key=key, force=True), metadata=auth("user", uid)
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = await stub.DeleteDefinition(
        preferences_pb2.DeleteDefinitionRequest(key=key, force=True, reason="retired"), metadata=ADMIN
    )
    assert reply.removed_overrides == 1
    rows = await db.fetch("SELECT kind, old_value, new_value, reason FROM changes WHERE key = $1 ORDER BY id", key)
    assert [(r["kind"], r["reason"]) for r in rows][-2:] == [("preference", "retired"), ("definition", "retired")]
    assert rows[-2]["old_value"] == 7 and rows[-2]["new_value"] is None


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        (
            preferences_pb2.Definition(
                key="Bad Key", category="c", type=common_pb2.VALUE_TYPE_BOOL, default_value=tv(True)
            ),
            "definition.key",
        ),
        (
            preferences_pb2.Definition(
                key="x" * 129, category="c", type=common_pb2.VALUE_TYPE_BOOL, default_value=tv(True)
            ),
            "definition.key",
        ),
        (preferences_pb2.Definition(key="ok.key", category="c", default_value=tv(True)), "definition.type"),
        (
            preferences_pb2.Definition(
                key="ok.key", category="c", type=common_pb2.VALUE_TYPE_ENUM, default_value=tv("a")
            ),
            "definition.allowed_values",
        ),
        (
            preferences_pb2.Definition(
                key="ok.key", category="c", type=common_pb2.VALUE_TYPE_INT, default_value=tv(50), max_value=10
            ),
            "definition.default_value",
        ),
        (
            preferences_pb2.Definition(
                key="ok.key", category="c", type=common_pb2.VALUE_TYPE_INT, default_value=tv("five")
            ),
            "definition.default_value",
        ),
        (
            preferences_pb2.Definition(
                key="ok.key",
                category="c",
                type=common_pb2.VALUE_TYPE_INT,
                default_value=tv(1),
                min_value=5,
                max_value=1,
            ),
            "definition.max_value",
        ),
        (
            preferences_pb2.Definition(key="ok.key", category="", type=common_pb2.VALUE_TYPE_INT, default_value=tv(1)),
            "definition.category",
        ),
    ],
)
async def test_malformed_definitions_are_rejected(stub, db, definition, field):
    before = await db.fetchval("SELECT count(*) FROM definitions")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert await db.fetchval("SELECT count(*) FROM definitions") == before
