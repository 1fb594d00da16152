"""Reads through an org's shared base give what resolving every layer for the subject gives, field for
field: over random definitions (dotted keys, rollouts by user and by org, enforced and narrowing
policies, scopes that may not override) and random GLOBAL, ORG and USER layers, for one subject
(GetEffectivePreferencesResponse) and for a batch (SubjectPreferences)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.model import Layer, Scope, ScopeKind, Subject
from prefd_server.kernel.scoped_cache import Layer as CachedLayer
from prefd_server.preferences.cache import org_base, subject_on_base
from prefd_server.preferences.convert import nested_to_pb
from prefd_server.preferences.effective_convert import batch_body, effective_body, effective_kept, subject_preferences
from prefd_server.preferences.model import Definition, StoredValue, ValueType
from prefd_server.preferences.policy import Policy
from prefd_server.preferences.resolve import resolve
from prefd_server.preferences.rollout import BucketBy, Rollout, Variant
from prefd_server.rpc.convert import effective_to_pb

_WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_KEYS = ["a.x", "a.y", "b.x", "b.y.z", "c", "d.e"]

_scope_kinds = st.sets(st.sampled_from(list(ScopeKind)), min_size=1)
_rollout = st.builds(
    lambda weights, by, salt: Rollout(
        tuple(Variant(f"v{n}", n * 10, w) for n, w in enumerate(weights)), salt, BucketBy(by)
    ),
    st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(any),
    st.sampled_from([b.value for b in BucketBy]),
    st.sampled_from(["", "salt"]),
)
_policy = st.builds(
    lambda value, enforced, low, high: Policy(value, enforced, low, high),
    st.integers(0, 50),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 20).map(float)),
    st.one_of(st.none(), st.integers(30, 60).map(float)),
)
# What one layer stores for one key: nothing, a plain value, a rollout or a policy.
_stored = st.one_of(
    st.none(),
    st.none(),
    st.integers(0, 60),
    _rollout.map(lambda r: r.to_json()),
    _policy.map(lambda p: p.to_json()),
)


def _layers(stored: list[list[Any]], user: str, org: str) -> list[tuple[Layer, Scope, CachedLayer[Any]]]:
    scopes = [
        (Layer.GLOBAL, Scope(ScopeKind.GLOBAL, "")),
        (Layer.ORG, Scope(ScopeKind.ORG, org)),
        (Layer.USER, Scope(ScopeKind.USER, user)),
    ]
    chain = []
    for n, (layer, scope) in enumerate(scopes):
        overrides = {
            key: StoredValue(scope, key, values[n], 3 + n, _WHEN, f"by-{n}")
            for key, values in zip(_KEYS, stored, strict=True)
            if values[n] is not None
        }
        chain.append((layer, scope, CachedLayer(overrides, 100 + n)))
    return chain


@settings(max_examples=300, deadline=None)
@given(
    defaults=st.lists(st.one_of(st.integers(0, 60), _rollout.map(lambda r: r.to_json())), min_size=6, max_size=6),
    allowed=st.lists(_scope_kinds, min_size=6, max_size=6),
    stored=st.lists(st.lists(_stored, min_size=3, max_size=3), min_size=6, max_size=6),
    selected=st.sets(st.sampled_from(_KEYS), min_size=1),
    user=st.sampled_from(["jack", "queen", "3"]),
    org=st.sampled_from(["acme", "globex"]),
)
def test_a_subject_over_its_org_base_reads_what_full_resolution_reads(
    defaults: list[Any],
    allowed: list[set[ScopeKind]],
    stored: list[list[Any]],
    selected: set[str],
    user: str,
    org: str,
) -> None:
    definitions = [
        Definition(key, "c", ValueType.INT, default, scopes=frozenset(kinds), version=1, updated_at=_WHEN)
        for key, default, kinds in zip(_KEYS, defaults, allowed, strict=True)
        if key in selected
    ]
    chain = _layers(stored, user, org)
    full = resolve(definitions, [(layer, scope, held.value) for layer, scope, held in chain])
    expected = preferences_pb2.GetEffectivePreferencesResponse(values=effective_to_pb(full), nested=nested_to_pb(full))

    base = org_base(definitions, chain)
    shared = subject_on_base(base, chain, {d.key: d for d in definitions})
    assert shared.values() == full
    assert (
        preferences_pb2.GetEffectivePreferencesResponse.FromString(effective_body(effective_kept(shared)[0]))
        == expected
    )

    subject = Subject(user, org)
    batch = preferences_pb2.BatchGetEffectivePreferencesResponse.FromString(
        batch_body([subject_preferences(subject, shared), subject_preferences(subject, shared)], b"")
    )
    assert len(batch.results) == 2 and batch.results[0] == batch.results[1]
    batch_entry = batch.results[0]
    assert batch_entry == preferences_pb2.SubjectPreferences(
        subject=common_pb2.Subject(user_id=user, org_id=org), values=expected.values, nested=expected.nested
    )
    # A second subject of the same org reuses the base (and its serialized pieces) and still reads its own.
    other_chain = [*chain[:2], (Layer.USER, Scope(ScopeKind.USER, "ten"), CachedLayer({}, 200))]
    other_full = resolve(definitions, [(layer, scope, held.value) for layer, scope, held in other_chain])
    other = subject_on_base(base, other_chain, {d.key: d for d in definitions})
    assert preferences_pb2.GetEffectivePreferencesResponse.FromString(
        effective_body(effective_kept(other)[0])
    ) == preferences_pb2.GetEffectivePreferencesResponse(
        values=effective_to_pb(other_full), nested=nested_to_pb(other_full)
    )
