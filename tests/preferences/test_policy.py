"""Policies through the real server: enforced and narrowing overrides at ORG and GLOBAL shadow what is stored
below (and say so in provenance), refuse writes that break them with nothing written, follow rollback and
reach watchers."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2
from tests.helpers.auth import auth, unique
from tests.helpers.requests import (
    GLOBAL,
    effective_value,
    error_reason,
    field_violations,
    org,
    py,
    set_request,
    tv,
    user,
)

ADMIN = auth("admin")
SERVICE = auth("service", "reader")


def policy_write(
    scope: common_pb2.Scope, key: str, value: Any, dry_run: bool = False, **policy: Any
) -> preferences_pb2.SetPreferencesRequest:
    write = preferences_pb2.PreferenceWrite(key=key, value=tv(value), policy=preferences_pb2.Policy(**policy))
    return preferences_pb2.SetPreferencesRequest(scope=scope, writes=[write], reason="policy", dry_run=dry_run)


async def define_limit(stub) -> str:
    """An INT key, 0-10, overridable everywhere, default 5."""
    key = f"tests.limit_{unique('k')}"
    definition = preferences_pb2.Definition(
        key=key, category="tests", type=common_pb2.VALUE_TYPE_INT, default_value=tv(5), min_value=0, max_value=10
    )
    await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    return key


async def effective(stub, user_id: str, org_id: str, key: str) -> preferences_pb2.EffectiveValue:
    value: preferences_pb2.EffectiveValue = await effective_value(stub, user_id, org_id, key, SERVICE)
    return value


async def stored(stub, scope: common_pb2.Scope, key: str) -> list[preferences_pb2.StoredPreference]:
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=scope), metadata=ADMIN)
    return [p for p in listed.preferences if p.key == key]


async def refused_by_policy(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "POLICY_VIOLATION"
    return refused.value


async def test_an_enforced_org_value_shadows_users_and_refuses_their_writes(stub) -> None:
    key = await define_limit(stub)
    org_id, alice = unique("o"), unique("u")
    await stub.SetPreferences(set_request(user(alice), {key: 8}), metadata=ADMIN)
    await stub.SetPreferences(policy_write(org(org_id), key, 3, enforced=True), metadata=ADMIN)
    value = await effective(stub, alice, org_id, key)
    assert py(value.value) == 3 and value.provenance.layer == common_pb2.LAYER_ORG
    (shadow,) = value.provenance.shadowed
    assert (shadow.scope.id, shadow.version, shadow.policy_scope.id, shadow.rule) == (alice, 1, org_id, "enforced")
    # The shadowed override stays stored; a user outside the org is not affected.
    assert [py(p.value) for p in await stored(stub, user(alice), key)] == [8]
    assert py((await effective(stub, alice, "", key)).value) == 8
    (policy_row,) = await stored(stub, org(org_id), key)
    assert policy_row.policy.enforced and py(policy_row.value) == 3
    for dry_run in (True, False):
        request = set_request(user(alice), {key: 2})
        request.org_id, request.dry_run = org_id, dry_run
        error = await refused_by_policy(stub.SetPreferences(request, metadata=ADMIN))
        detail = rpc_status.from_call(error)
        assert detail is not None and org_id in error.details()
    assert [(py(p.value), p.version) for p in await stored(stub, user(alice), key)] == [(8, 1)]


async def test_a_narrowing_keeps_users_within_it(stub) -> None:
    key = await define_limit(stub)
    org_id, bob, carol = unique("o"), unique("u"), unique("u")
    await stub.SetPreferences(set_request(user(bob), {key: 9}), metadata=ADMIN)
    await stub.SetPreferences(set_request(user(carol), {key: 1}), metadata=ADMIN)
    await stub.SetPreferences(policy_write(org(org_id), key, 2, max_value=3), metadata=ADMIN)
    shadowed = await effective(stub, bob, org_id, key)
    assert py(shadowed.value) == 2 and [s.rule for s in shadowed.provenance.shadowed] == ["max 3"]
    within = await effective(stub, carol, org_id, key)
    assert py(within.value) == 1 and within.provenance.layer == common_pb2.LAYER_USER and not within.provenance.shadowed
    ok = set_request(user(bob), {key: 3})
    ok.org_id = org_id
    await stub.SetPreferences(ok, metadata=ADMIN)
    assert py((await effective(stub, bob, org_id, key)).value) == 3
    too_big = set_request(user(bob), {key: 4})
    too_big.org_id = org_id
    error = await refused_by_policy(stub.SetPreferences(too_big, metadata=ADMIN))
    assert "max 3" in error.details()


async def test_a_global_allowed_subset_binds_orgs_and_users(stub) -> None:
    key = f"tests.theme_{unique('k')}"
    definition = preferences_pb2.Definition(
        key=key,
        category="tests",
        type=common_pb2.VALUE_TYPE_ENUM,
        default_value=tv("light"),
        allowed_values=[tv("light"), tv("dark"), tv("system")],
    )
    await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    org_id = unique("o")
    await stub.SetPreferences(set_request(org(org_id), {key: "system"}), metadata=ADMIN)
    await stub.SetPreferences(
        policy_write(GLOBAL, key, "light", allowed_values=[tv("light"), tv("dark")]), metadata=ADMIN
    )
    value = await effective(stub, unique("u"), org_id, key)
    assert py(value.value) == "light" and value.provenance.layer == common_pb2.LAYER_GLOBAL
    assert [(s.scope.id, s.rule) for s in value.provenance.shadowed] == [(org_id, 'allowed "light", "dark"')]
    await refused_by_policy(stub.SetPreferences(set_request(org(org_id), {key: "system"}), metadata=ADMIN))
    await stub.SetPreferences(set_request(org(org_id), {key: "dark"}), metadata=ADMIN)
    assert py((await effective(stub, unique("u"), org_id, key)).value) == "dark"
    await stub.SetPreferences(set_request(GLOBAL, {key: "light"}), metadata=ADMIN)  # the policy is lifted


async def test_bad_policies_are_refused_and_write_nothing(stub) -> None:
    key = await define_limit(stub)
    org_id = unique("o")
    cases = [
        (policy_write(org(org_id), key, 3, max_value=11), "writes[0].policy"),  # wider than the definition
        (policy_write(org(org_id), key, 3, min_value=-1), "writes[0].policy"),
        (policy_write(org(org_id), key, 3, min_value=4, max_value=2), "writes[0].policy"),
        (policy_write(org(org_id), key, 5, max_value=3), "writes[0].policy"),  # its own value outside
        (policy_write(user(unique("u")), key, 3, enforced=True), "writes[0].policy"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SetPreferences(request, metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(refused.value), field_violations(refused.value)
    assert await stored(stub, org(org_id), key) == []


async def test_rollback_across_a_policy_change_and_a_watcher_sees_it_land(stub, channel, db) -> None:
    key = await define_limit(stub)
    org_id, dave = unique("o"), unique("u")
    await stub.SetPreferences(set_request(user(dave), {key: 9}), metadata=ADMIN)
    before_policy = await db.fetchval("SELECT max(id) FROM changes")
    watch = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(
            subject=common_pb2.Subject(user_id=dave, org_id=org_id), key_prefixes=[key]
        ),
        metadata=ADMIN,
    )
    assert (await watch.read()).HasField("started")
    await stub.SetPreferences(policy_write(org(org_id), key, 2, enforced=True), metadata=ADMIN)
    async with asyncio.timeout(10):
        message = await watch.read()
        while not message.HasField("change"):
            message = await watch.read()
    watch.cancel()
    assert py(message.change.effective.value) == 2
    assert [s.rule for s in message.change.effective.provenance.shadowed] == ["enforced"]
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    target = audit_pb2.RollbackTarget(scopes=[org(org_id)], to=audit_pb2.HistoryPoint(change_id=before_policy))
    preview = await audit.PreviewRollback(audit_pb2.PreviewRollbackRequest(target=target), metadata=ADMIN)
    await audit.Rollback(
        audit_pb2.RollbackRequest(target=target, reason="lift", preview_token=preview.preview_token), metadata=ADMIN
    )
    restored = await effective(stub, dave, org_id, key)
    assert py(restored.value) == 9 and not restored.provenance.shadowed
