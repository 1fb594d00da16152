"""Templates through the real server: kept by admins, applied as one validated, atomic, audited write (change rows
name the template) with usage counts, by admins anywhere and by users to themselves only."""

from __future__ import annotations

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, templates_pb2, templates_pb2_grpc
from tests.helpers.auth import auth, unique
from tests.helpers.requests import field_violations, org, py, tv, user

ADMIN = auth("admin")
T = templates_pb2


@pytest.fixture
def templates(channel: grpc.aio.Channel) -> templates_pb2_grpc.TemplateServiceStub:
    return templates_pb2_grpc.TemplateServiceStub(channel)


def template(name: str, kind: int = common_pb2.SCOPE_KIND_USER, **values: object) -> templates_pb2.Template:
    return T.Template(
        name=name,
        scope_kind=kind,
        description="a trader's desk",
        values=[T.TemplateValue(key=key.replace("__", "."), value=tv(v)) for key, v in values.items()],
    )


async def stored_values(stub, scope: common_pb2.Scope) -> dict[str, object]:
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=scope), metadata=ADMIN)
    return {p.key: py(p.value) for p in listed.preferences}


async def test_apply_is_one_audited_write_with_usage_counted(stub, templates, db) -> None:
    name = unique("desk")
    created = await templates.CreateTemplate(
        T.CreateTemplateRequest(template=template(name, display__theme="dark", display__items_per_page=50)),
        metadata=ADMIN,
    )
    assert created.template.version == 1 and created.template.times_applied == 0
    alice = unique("u")
    dry = await templates.ApplyTemplate(
        T.ApplyTemplateRequest(name=name, scope=user(alice), dry_run=True), metadata=ADMIN
    )
    assert dry.dry_run and {c.key for c in dry.changes} == {"display.theme", "display.items_per_page"}
    assert await stored_values(stub, user(alice)) == {}
    applied = await templates.ApplyTemplate(
        T.ApplyTemplateRequest(name=name, scope=user(alice), reason="onboarding"), metadata=ADMIN
    )
    assert applied.template_version == 1 and not applied.dry_run
    assert await stored_values(stub, user(alice)) == {"display.theme": "dark", "display.items_per_page": 50}
    reasons = await db.fetch("SELECT key, reason FROM changes WHERE scope_id = $1 ORDER BY key", alice)
    assert [(r["key"], r["reason"]) for r in reasons] == [
        ("display.items_per_page", f"template {name} v1: onboarding"),
        ("display.theme", f"template {name} v1: onboarding"),
    ]
    got = (await templates.GetTemplate(T.GetTemplateRequest(name=name), metadata=ADMIN)).template
    assert got.times_applied == 1 and got.HasField("last_applied_time")


async def test_one_bad_value_writes_nothing(stub, templates) -> None:
    name = unique("desk")
    await templates.CreateTemplate(
        T.CreateTemplateRequest(template=template(name, display__theme="dark", display__items_per_page=50)),
        metadata=ADMIN,
    )
    bob, org_id = unique("u"), unique("o")
    # An org policy makes one of the template's values unwritable for the org's users: nothing is written.
    policy = preferences_pb2.PreferenceWrite(
        key="display.items_per_page", value=tv(20), policy=preferences_pb2.Policy(max_value=30)
    )
    await stub.SetPreferences(
        preferences_pb2.SetPreferencesRequest(scope=org(org_id), writes=[policy], reason="cap"), metadata=ADMIN
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await templates.ApplyTemplate(T.ApplyTemplateRequest(name=name, scope=user(bob), org_id=org_id), metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await stored_values(stub, user(bob)) == {}
    got = (await templates.GetTemplate(T.GetTemplateRequest(name=name), metadata=ADMIN)).template
    assert got.times_applied == 0


async def test_bad_templates_are_refused(templates) -> None:
    cases = [
        (template(unique("t"), nosuch__key="x"), "template.values[0].key"),
        (template(unique("t"), display__theme="purple"), "template.values[0].value"),
        (template("9starts-with-a-digit", display__theme="dark"), "template.name"),
        (template(unique("t"), common_pb2.SCOPE_KIND_GLOBAL, display__theme="dark"), "template.scope_kind"),
        (template(unique("t")), "template.values"),
    ]
    too_many = template(unique("t"))
    too_many.values.extend(T.TemplateValue(key=f"display.k{i}", value=tv(1)) for i in range(501))
    cases.append((too_many, "template.values"))
    for bad, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await templates.CreateTemplate(T.CreateTemplateRequest(template=bad), metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(refused.value), (field, field_violations(refused.value))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await templates.GetTemplate(T.GetTemplateRequest(name=unique("none")), metadata=ADMIN)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_users_apply_user_templates_to_themselves_only(stub, templates) -> None:
    name, org_name = unique("mine"), unique("orgwide")
    await templates.CreateTemplate(
        T.CreateTemplateRequest(template=template(name, display__theme="dark")), metadata=ADMIN
    )
    await templates.CreateTemplate(
        T.CreateTemplateRequest(template=template(org_name, common_pb2.SCOPE_KIND_ORG, display__theme="dark")),
        metadata=ADMIN,
    )
    carol, dave, org_id = unique("u"), unique("u"), unique("o")
    as_carol = auth("user", carol, org=org_id)
    await templates.ApplyTemplate(T.ApplyTemplateRequest(name=name, scope=user(carol)), metadata=as_carol)
    assert await stored_values(stub, user(carol)) == {"display.theme": "dark"}
    for request in (
        T.ApplyTemplateRequest(name=name, scope=user(dave)),
        T.ApplyTemplateRequest(name=org_name, scope=org(org_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await templates.ApplyTemplate(request, metadata=as_carol)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await templates.CreateTemplate(
            T.CreateTemplateRequest(template=template(unique("t"), display__theme="dark")), metadata=as_carol
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as wrong_kind:
        await templates.ApplyTemplate(T.ApplyTemplateRequest(name=org_name, scope=user(carol)), metadata=ADMIN)
    assert wrong_kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stored_values(stub, user(dave)) == {}


async def test_update_list_and_delete(templates) -> None:
    name = unique("desk")
    await templates.CreateTemplate(
        T.CreateTemplateRequest(template=template(name, display__theme="dark")), metadata=ADMIN
    )
    updated = await templates.UpdateTemplate(
        T.UpdateTemplateRequest(template=template(name, display__theme="light"), expected_version=1), metadata=ADMIN
    )
    assert updated.template.version == 2 and py(updated.template.values[0].value) == "light"
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await templates.UpdateTemplate(
            T.UpdateTemplateRequest(template=template(name, display__theme="dark"), expected_version=1), metadata=ADMIN
        )
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    names, token = [], ""
    while True:
        page = await templates.ListTemplates(T.ListTemplatesRequest(page_size=2, page_token=token), metadata=ADMIN)
        names += [t.name for t in page.templates]
        token = page.next_page_token
        if not token:
            break
    assert name in names and names == sorted(names)
    await templates.DeleteTemplate(T.DeleteTemplateRequest(name=name), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await templates.DeleteTemplate(T.DeleteTemplateRequest(name=name), metadata=ADMIN)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
