"""Resolution default <- GLOBAL <- ORG <- USER with provenance, nesting, and batch reads."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.model import Layer, Scope, ScopeKind
from prefd_server.preferences.model import Definition, StoredValue, ValueType
from prefd_server.preferences.resolve import flatten, nest, resolve
from tests.helpers.auth import auth, unique
from tests.helpers.requests import GLOBAL, field_violations, org, py, set_request, tv, user

ADMIN = auth("admin")
LAYER_SCOPES = {"GLOBAL": Layer.GLOBAL, "ORG": Layer.ORG, "USER": Layer.USER}


async def test_every_layer_combination_resolves_to_the_most_specific(stub):
    """Eight keys, one per subset of {GLOBAL, ORG, USER} that sets it; each resolves from its most specific."""
    prefix = unique("r")
    oid, uid = unique("o"), unique("u")
    combos = list(itertools.product([False, True], repeat=3))
    keys = {combo: f"{prefix}.k{i}" for i, combo in enumerate(combos)}
    for key in keys.values():
        await stub.CreateDefinition(
            preferences_pb2.CreateDefinitionRequest(
                definition=preferences_pb2.Definition(
                    key=key, category="tests", type=common_pb2.VALUE_TYPE_STRING, default_value=tv("default")
                )
            ),
            metadata=ADMIN,
        )
    for layer_index, scope in enumerate([GLOBAL, org(oid), user(uid)]):
        name = ["global", "org", "user"][layer_index]
        values = {key: name for combo, key in keys.items() if combo[layer_index]}
        await stub.SetPreferences(set_request(scope, values, org_id=oid if layer_index == 2 else ""), metadata=ADMIN)

    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=uid, org_id=oid), key_prefixes=[prefix + "."]
        ),
        metadata=ADMIN,
    )
    got = {v.key: v for v in reply.values}
    assert len(got) == 8
    for combo, key in keys.items():
        value = got[key]
        if combo[2]:
            expected = ("user", common_pb2.LAYER_USER, common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=uid))
        elif combo[1]:
            expected = ("org", common_pb2.LAYER_ORG, common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=oid))
        elif combo[0]:
            expected = ("global", common_pb2.LAYER_GLOBAL, common_pb2.Scope(kind=common_pb2.SCOPE_KIND_GLOBAL))
        else:
            expected = ("default", common_pb2.LAYER_DEFAULT, common_pb2.Scope())
        assert (py(value.value), value.provenance.layer, value.provenance.scope) == expected, key
        assert value.provenance.version == 1
        assert value.provenance.updated_by == "ops"  # the definition's author or the override's writer
        assert value.provenance.updated_at.seconds > 0
    assert reply.nested[prefix]["k7"] == "user"
    assert reply.cursor.token

    # A subject of another org sees none of the org's overrides.
    other = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=uid, org_id=unique("o")), key_prefixes=[keys[(False, True, False)]]
        ),
        metadata=ADMIN,
    )
    assert py(other.values[0].value) == "default"


async def test_scope_not_allowed_for_a_key_is_rejected(stub, db):
    key, uid = f"{unique()}.orgwide", unique("u")
    await stub.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(
            definition=preferences_pb2.Definition(
                key=key,
                category="tests",
                type=common_pb2.VALUE_TYPE_INT,
                default_value=tv(1),
                overridable_scopes=[common_pb2.SCOPE_KIND_GLOBAL, common_pb2.SCOPE_KIND_ORG],
            )
        ),
        metadata=ADMIN,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPreferences(set_request(user(uid), {key: 2}), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be overridden at USER" in field_violations(err.value)["writes[0].key"]
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", uid) == 0


async def test_filters_by_category_and_prefix(stub):
    subject = common_pb2.Subject(user_id=unique("u"))
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject, categories=["locale"]), metadata=ADMIN
    )
    assert [v.key for v in reply.values] == ["locale.language", "locale.timezone"]
    assert dict(reply.nested["locale"]) == {"language": "en", "timezone": "UTC"}
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=["ui.qualityThresholds."]),
        metadata=ADMIN,
    )
    assert {v.key.rsplit(".", 1)[1] for v in reply.values} == {"autoApproval", "flagging", "minimumAcceptable"}


async def test_nested_view_round_trips_to_the_flat_values(stub):
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u"))),
        metadata=ADMIN,
    )
    from google.protobuf import json_format

    nested = json_format.MessageToDict(reply.nested)
    flat = {v.key: py(v.value) for v in reply.values}
    for key, value in flat.items():
        node = nested
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert len(flat) > 50


async def test_batch_reads_many_subjects_in_one_snapshot(stub):
    oid = unique("o")
    await stub.SetPreferences(set_request(org(oid), {"display.theme": "dark"}), metadata=ADMIN)
    special = unique("u")
    await stub.SetPreferences(set_request(user(special), {"display.theme": "system"}, org_id=oid), metadata=ADMIN)
    subjects = [common_pb2.Subject(user_id=f"{oid}-u{i}", org_id=oid) for i in range(999)]
    subjects.append(common_pb2.Subject(user_id=special, org_id=oid))
    reply = await stub.BatchGetEffectivePreferences(
        preferences_pb2.BatchGetEffectivePreferencesRequest(subjects=subjects, key_prefixes=["display.theme"]),
        metadata=auth("service", "trading-engine"),
    )
    assert len(reply.results) == 1000
    assert [r.subject.user_id for r in reply.results] == [s.user_id for s in subjects]
    assert {py(r.values[0].value) for r in reply.results[:-1]} == {"dark"}
    assert py(reply.results[-1].values[0].value) == "system"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.BatchGetEffectivePreferences(
            preferences_pb2.BatchGetEffectivePreferencesRequest(subjects=[*subjects, subjects[0]]), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subjects" in field_violations(err.value)


# --- pure resolution properties -------------------------------------------------------------

_when = datetime(2026, 1, 1, tzinfo=UTC)
_scopes = [
    (Layer.GLOBAL, Scope(ScopeKind.GLOBAL)),
    (Layer.ORG, Scope(ScopeKind.ORG, "o")),
    (Layer.USER, Scope(ScopeKind.USER, "u")),
]


@given(
    st.lists(
        st.tuples(
            st.integers(),  # default
            st.lists(st.one_of(st.none(), st.integers()), min_size=3, max_size=3),  # per-layer override or None
            st.sets(st.sampled_from(list(ScopeKind)), min_size=1),  # scopes allowed to override
        ),
        min_size=1,
        max_size=8,
    )
)
def test_resolve_takes_the_most_specific_allowed_layer(spec):
    definitions, layers = [], [(layer, scope, {}) for layer, scope in _scopes]
    for i, (default, overrides, allowed) in enumerate(spec):
        key = f"k{i}"
        definitions.append(Definition(key, "c", ValueType.INT, default, scopes=frozenset(allowed), version=1))
        for (layer, scope, stored), value in zip(layers, overrides, strict=True):
            if value is not None:
                stored[key] = StoredValue(scope, key, value, layer.value, _when, f"by-{layer.name}")
    resolved = resolve(definitions, layers)
    for (default, overrides, allowed), result in zip(spec, resolved, strict=True):
        candidates = [
            (layer, value)
            for (layer, scope), value in zip(_scopes, overrides, strict=True)
            if value is not None and scope.kind in allowed
        ]
        if candidates:
            layer, value = candidates[-1]
            assert (result.value, result.layer, result.updated_by) == (value, layer, f"by-{layer.name}")
        else:
            assert (result.value, result.layer, result.scope) == (default, Layer.DEFAULT, None)


_segment = st.from_regex(r"[a-z][a-z0-9_]{0,4}", fullmatch=True)


@given(st.dictionaries(st.lists(_segment, min_size=1, max_size=4).map(".".join), st.integers(), max_size=20))
def test_nest_and_flatten_round_trip(flat):
    # Definition keys never prefix one another; drop any that would.
    keys = sorted(flat)
    clean = {k: v for k, v in flat.items() if not any(o.startswith(k + ".") for o in keys)}
    assert flatten(nest(clean)) == clean
