"""What a write answers is what a read right after returns: values, provenance, versions and timestamps."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2
from tests.helpers.auth import auth, unique
from tests.helpers.requests import org, py, set_request, user

ADMIN = auth("admin")


@pytest.fixture(scope="session")
def audit(channel: grpc.aio.Channel) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel)


async def _effective(stub, user_id: str, org_id: str) -> dict[str, preferences_pb2.EffectiveValue]:
    """Every effective value of a subject, by key, read now."""
    read = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id)),
        metadata=ADMIN,
    )
    return {v.key: v for v in read.values}


def _without_time(value: preferences_pb2.EffectiveValue) -> preferences_pb2.EffectiveValue:
    copy = preferences_pb2.EffectiveValue()
    copy.CopyFrom(value)
    copy.provenance.ClearField("updated_at")
    return copy


# --- a rollback of several scopes reports the state all of them leave ------------------


@pytest.mark.parametrize("user_first", [True, False], ids=["user-then-org", "org-then-user"])
async def test_multi_scope_rollback_reports_what_a_read_returns(stub, audit, db, user_first: bool) -> None:
    org_id, user_id = unique("o"), unique("u")
    await stub.SetPreferences(set_request(org(org_id), {"locale.timezone": "Asia/Tokyo"}), metadata=ADMIN)
    await stub.SetPreferences(set_request(user(user_id), {"display.theme": "dark"}, org_id=org_id), metadata=ADMIN)
    point: int = await db.fetchval("SELECT max(id) FROM changes")
    await stub.SetPreferences(
        set_request(user(user_id), {"display.theme": "system", "locale.timezone": "Europe/Paris"}, org_id=org_id),
        metadata=ADMIN,
    )
    await stub.SetPreferences(
        set_request(org(org_id), {"locale.timezone": "America/New_York", "display.theme": "light"}), metadata=ADMIN
    )

    scopes = [user(user_id), org(org_id)] if user_first else [org(org_id), user(user_id)]
    target = audit_pb2.RollbackTarget(scopes=scopes, to=audit_pb2.HistoryPoint(change_id=point), org_id=org_id)
    preview = await audit.PreviewRollback(audit_pb2.PreviewRollbackRequest(target=target), metadata=ADMIN)
    done = await audit.Rollback(
        audit_pb2.RollbackRequest(target=target, reason="undo both", preview_token=preview.preview_token),
        metadata=ADMIN,
    )

    # The USER scope resolves through the ORG scope; the ORG scope is what a member without overrides reads.
    reads = {
        (common_pb2.SCOPE_KIND_USER, user_id): await _effective(stub, user_id, org_id),
        (common_pb2.SCOPE_KIND_ORG, org_id): await _effective(stub, unique("nobody"), org_id),
    }
    for answer in (preview.scopes, done.scopes):
        assert [s.scope for s in answer] == scopes
    by_scope = {s.scope.kind: s for s in done.scopes}
    mine = {v.key: v for v in by_scope[common_pb2.SCOPE_KIND_USER].effective_values}
    assert py(mine["locale.timezone"].value) == "Asia/Tokyo"
    assert mine["locale.timezone"].provenance.layer == common_pb2.LAYER_ORG
    assert py(mine["display.theme"].value) == "dark"
    assert mine["display.theme"].provenance.layer == common_pb2.LAYER_USER
    theirs = {v.key: v for v in by_scope[common_pb2.SCOPE_KIND_ORG].effective_values}
    assert py(theirs["locale.timezone"].value) == "Asia/Tokyo"
    assert py(theirs["display.theme"].value) == "light"  # the definition default
    assert theirs["display.theme"].provenance.layer == common_pb2.LAYER_DEFAULT

    for result, planned in zip(done.scopes, preview.scopes, strict=True):
        read = reads[(result.scope.kind, result.scope.id)]
        assert {v.key for v in result.effective_values} == {"display.theme", "locale.timezone"}
        for value in result.effective_values:
            assert value == read[value.key], (result.scope, value.key)
        # A preview cannot know the commit time of a rollback still to come; all else matches.
        assert [_without_time(v) for v in planned.effective_values] == [
            _without_time(read[v.key]) for v in planned.effective_values
        ]


# --- a write's response carries the stored timestamps ------------------------------------


async def test_set_preferences_answers_the_stored_provenance(stub) -> None:
    org_id, user_id = unique("o"), unique("u")
    written = await stub.SetPreferences(
        set_request(org(org_id), {"locale.timezone": "Asia/Tokyo", "display.theme": "dark"}), metadata=ADMIN
    )
    read = await _effective(stub, unique("nobody"), org_id)
    assert len(written.effective_values) == 2
    for value in written.effective_values:
        assert value.provenance.layer == common_pb2.LAYER_ORG and value.provenance.version == 1
        assert value == read[value.key]

    written = await stub.SetPreferences(
        set_request(user(user_id), {"display.theme": "system", "locale.timezone": "Europe/Paris"}, org_id=org_id),
        metadata=ADMIN,
    )
    read = await _effective(stub, user_id, org_id)
    for value in written.effective_values:
        assert value.provenance.layer == common_pb2.LAYER_USER
        assert value == read[value.key]
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=user(user_id)), metadata=ADMIN)
    stored = {p.key: p for p in listed.preferences}
    for value in written.effective_values:
        assert stored[value.key].update_time == value.provenance.updated_at
        assert stored[value.key].version == value.provenance.version

    # A second write of one key: its new time and version, the other key's unchanged.
    written = await stub.SetPreferences(
        set_request(user(user_id), {"display.theme": "dark"}, org_id=org_id), metadata=ADMIN
    )
    read = await _effective(stub, user_id, org_id)
    assert [v.key for v in written.effective_values] == ["display.theme"]
    assert written.effective_values[0].provenance.version == 2
    assert written.effective_values[0] == read["display.theme"]


async def test_rollback_of_one_scope_answers_the_stored_provenance(stub, audit, db) -> None:
    user_id = unique("u")
    await stub.SetPreferences(set_request(user(user_id), {"display.theme": "dark"}), metadata=ADMIN)
    point: int = await db.fetchval("SELECT max(id) FROM changes")
    await stub.SetPreferences(set_request(user(user_id), {"display.theme": "system"}), metadata=ADMIN)
    target = audit_pb2.RollbackTarget(scopes=[user(user_id)], to=audit_pb2.HistoryPoint(change_id=point))
    done = await audit.Rollback(audit_pb2.RollbackRequest(target=target, reason="undo"), metadata=ADMIN)
    read = await _effective(stub, user_id, "")
    (value,) = done.scopes[0].effective_values
    assert (py(value.value), value.provenance.version) == ("dark", 3)
    assert value == read["display.theme"]


async def test_definition_writes_answer_the_stored_definition(stub) -> None:
    key = f"test.truth_{unique('k')}"
    created = await stub.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(
            definition=preferences_pb2.Definition(
                key=key,
                category="test",
                type=common_pb2.VALUE_TYPE_INT,
                default_value=common_pb2.TypedValue(int_value=1),
                description="A definition for write-read tests.",
            )
        ),
        metadata=ADMIN,
    )
    got = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key=key), metadata=ADMIN)
    assert created.definition == got.definition
    created.definition.default_value.int_value = 2
    updated = await stub.UpdateDefinition(
        preferences_pb2.UpdateDefinitionRequest(
            definition=created.definition, update_mask=field_mask_pb2.FieldMask(paths=["default_value"])
        ),
        metadata=ADMIN,
    )
    got = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key=key), metadata=ADMIN)
    assert updated.definition == got.definition and got.definition.version == 2
    # A read resolving to the default carries the definition's stored version and time.
    read = await _effective(stub, unique("u"), "")
    assert read[key].provenance.updated_at == got.definition.update_time
    await stub.DeleteDefinition(preferences_pb2.DeleteDefinitionRequest(key=key), metadata=ADMIN)


async def test_ai_writes_answer_the_stored_config_and_model(ai_stub, db: asyncpg.Connection) -> None:
    created = await ai_stub.CreateAIConfig(
        ai.CreateAIConfigRequest(config=ai.AIConfig(name=unique("cfg"), user_id=unique("u"))), metadata=ADMIN
    )
    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.config.id), metadata=ADMIN)
    assert created.config == got.config
    updated = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(
            config=ai.AIConfig(id=created.config.id, priority=3),
            update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
        ),
        metadata=ADMIN,
    )
    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.config.id), metadata=ADMIN)
    assert updated.config == got.config and got.config.version == 2
    toggled = await ai_stub.SetAIConfigActive(
        ai.SetAIConfigActiveRequest(id=created.config.id, active=False), metadata=ADMIN
    )
    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.config.id), metadata=ADMIN)
    assert toggled.config == got.config and got.config.version == 3
    await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=created.config.id), metadata=ADMIN)

    name = unique("truth-model-")
    model = await ai_stub.UpdateModel(
        ai.UpdateModelRequest(
            model=ai.AIModel(
                model=name, context_window=8000, output_limit=1000, input_usd_per_1k=0.001, output_usd_per_1k=0.002
            )
        ),
        metadata=ADMIN,
    )
    listed = {m.model: m for m in (await ai_stub.ListModels(ai.ListModelsRequest(), metadata=ADMIN)).models}
    assert model.model == listed[name]
