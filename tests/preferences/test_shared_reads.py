"""Reads over an org's shared base through the server: a subject with its own overrides answers the same
from a miss, from its response kept in parts and from its response kept whole; a batch answers the same."""

from __future__ import annotations

from typing import Any

from prefd.v1 import common_pb2, preferences_pb2
from tests.helpers.auth import auth, unique
from tests.helpers.requests import org, set_request, user

ADMIN = auth("admin", sub="shared-reads")


async def test_a_subject_with_own_values_reads_the_same_from_a_miss_its_parts_and_its_whole_body(stub: Any) -> None:
    acme, alice, bob = unique("o"), unique("u"), unique("u")
    await stub.SetPreferences(
        set_request(org(acme), {"display.theme": "dark", "locale.language": "fr"}), metadata=ADMIN
    )
    await stub.SetPreferences(set_request(user(alice), {"display.theme": "light"}, org_id=acme), metadata=ADMIN)
    request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=alice, org_id=acme))
    answers = [await stub.GetEffectivePreferences(request, metadata=ADMIN) for _ in range(3)]
    for answer in answers:
        answer.ClearField("cursor")
    assert answers[0] == answers[1] == answers[2]
    values = {v.key: v for v in answers[0].values}
    assert values["display.theme"].value.string_value == "light"
    assert values["display.theme"].provenance.layer == common_pb2.LAYER_USER
    assert values["locale.language"].value.string_value == "fr"
    assert answers[0].nested.fields["display"].struct_value.fields["theme"].string_value == "light"

    batch = await stub.BatchGetEffectivePreferences(
        preferences_pb2.BatchGetEffectivePreferencesRequest(
            subjects=[request.subject, common_pb2.Subject(user_id=bob, org_id=acme)]
        ),
        metadata=ADMIN,
    )
    assert list(batch.results[0].values) == list(answers[0].values)
    assert batch.results[0].nested == answers[0].nested
    bob_values = {v.key: v for v in batch.results[1].values}
    assert bob_values["display.theme"].value.string_value == "dark"
    assert bob_values["display.theme"].provenance.layer == common_pb2.LAYER_ORG
