"""Bad input: INVALID_ARGUMENT naming the offending field, NOT_FOUND for one named thing; nothing written."""

from __future__ import annotations

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2
from tests.helpers.auth import auth, unique
from tests.helpers.requests import field_violations, set_request, tv, user

ADMIN = auth("admin")
UID = unique("bad")


def write(key: str, value: common_pb2.TypedValue) -> preferences_pb2.SetPreferencesRequest:
    return preferences_pb2.SetPreferencesRequest(
        scope=user(UID), writes=[preferences_pb2.PreferenceWrite(key=key, value=value)]
    )


BIG_JSON = tv({"blob": "x" * (64 * 1024)})

CASES = {
    "unknown key": (write("no.such.key", tv(True)), "writes[0].key"),
    "wrong type": (write("display.items_per_page", tv("ten")), "writes[0].value"),
    "bool for int": (write("display.items_per_page", tv(True)), "writes[0].value"),
    "out of range": (write("display.items_per_page", tv(0)), "writes[0].value"),
    "not an allowed value": (write("ui.rowsPerPage", tv(30)), "writes[0].value"),
    "enum not allowed": (write("ui.theme", tv("purple")), "writes[0].value"),
    "key over 128 characters": (write("a" * 129, tv(True)), "writes[0].key"),
    "string over 4 KiB": (write("locale.timezone", tv("x" * 4097)), "writes[0].value.string_value"),
    "json over 64 KiB": (write("notifications.trading.event_rules", BIG_JSON), "writes[0].value.json_value"),
    "no value": (
        preferences_pb2.SetPreferencesRequest(
            scope=user(UID), writes=[preferences_pb2.PreferenceWrite(key="ui.theme")]
        ),
        "writes[0].value",
    ),
    "more than 500 keys": (
        preferences_pb2.SetPreferencesRequest(
            scope=user(UID),
            writes=[preferences_pb2.PreferenceWrite(key=f"k.k{i}", value=tv(1)) for i in range(501)],
        ),
        "writes",
    ),
    "no keys": (preferences_pb2.SetPreferencesRequest(scope=user(UID)), "writes"),
    "duplicate key": (
        preferences_pb2.SetPreferencesRequest(
            scope=user(UID),
            writes=[preferences_pb2.PreferenceWrite(key="ui.theme", value=tv("dark"))] * 2,
        ),
        "writes[1]",
    ),
    "empty user id": (set_request(user(""), {"ui.theme": "dark"}), "scope.id"),
    "malformed user id": (set_request(user("bad id/../x"), {"ui.theme": "dark"}), "scope.id"),
    "unspecified scope": (set_request(common_pb2.Scope(id=UID), {"ui.theme": "dark"}), "scope.kind"),
    "global with id": (
        set_request(common_pb2.Scope(kind=common_pb2.SCOPE_KIND_GLOBAL, id="x"), {"ui.theme": "dark"}),
        "scope.id",
    ),
    "org_id on an org write": (
        set_request(common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id="o1"), {"ui.theme": "dark"}, org_id="o2"),
        "org_id",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_writes_are_invalid_argument_and_write_nothing(stub, db, case):
    request, field = CASES[case]
    before = await db.fetchval("SELECT count(*) FROM changes")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(request, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = field_violations(err.value)
    assert field in violations, violations
    assert await db.fetchval("SELECT count(*) FROM changes") == before
    assert await db.fetchval("SELECT count(*) FROM preference_values WHERE scope_id = $1", UID) == 0


@pytest.mark.parametrize(
    ("rpc", "message", "field"),
    [
        ("GetEffectivePreferences", preferences_pb2.GetEffectivePreferencesRequest(), "subject.user_id"),
        (
            "GetEffectivePreferences",
            preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="u1", org_id="bad org")),
            "subject.org_id",
        ),
        (
            "GetEffectivePreferences",
            preferences_pb2.GetEffectivePreferencesRequest(
                subject=common_pb2.Subject(user_id="u1"), key_prefixes=["x" * 129]
            ),
            "key_prefixes[0]",
        ),
        ("BatchGetEffectivePreferences", preferences_pb2.BatchGetEffectivePreferencesRequest(), "subjects"),
        (
            "BatchGetEffectivePreferences",
            preferences_pb2.BatchGetEffectivePreferencesRequest(
                subjects=[common_pb2.Subject(user_id="ok"), common_pb2.Subject(user_id="")]
            ),
            "subjects[1].user_id",
        ),
        (
            "ListPreferences",
            preferences_pb2.ListPreferencesRequest(scope=user("u1"), page_token="garbage!"),
            "page_token",
        ),
        ("ListPreferences", preferences_pb2.ListPreferencesRequest(scope=user("u1"), page_size=-1), "page_size"),
        ("ListDefinitions", preferences_pb2.ListDefinitionsRequest(page_token="bm90IGpzb24"), "page_token"),
        ("GetDefinition", preferences_pb2.GetDefinitionRequest(key=""), "key"),
        ("DeletePreferences", preferences_pb2.DeletePreferencesRequest(scope=user("u1")), "keys"),
        (
            "DeletePreferences",
            preferences_pb2.DeletePreferencesRequest(scope=user("u1"), keys=["nope.key"]),
            "keys[0].key",
        ),
        ("ResetPreferences", preferences_pb2.ResetPreferencesRequest(scope=common_pb2.Scope()), "scope.kind"),
    ],
)
async def test_bad_reads_and_removals_name_the_field(stub, rpc, message, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stub, rpc)(message, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in field_violations(err.value)


async def test_unknown_definition_is_not_found(stub):
    for call in (
        stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="no.such.definition"), metadata=ADMIN),
        stub.DeleteDefinition(preferences_pb2.DeleteDefinitionRequest(key="no.such.definition"), metadata=ADMIN),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_undecodable_read_request_is_invalid_argument(channel) -> None:
    call = channel.unary_unary(
        "/prefd.v1.PreferencesService/GetEffectivePreferences",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\xff\xff\xff\xff", metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in field_violations(err.value)
