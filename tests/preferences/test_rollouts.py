"""Rollouts: flagd fractional v2 bucketing (conformance vectors, shares, stable moves), and rollouts as definition
defaults and ORG overrides through the real server, with the variant in provenance and bad rollouts refused."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.preferences.rollout import BucketBy, Rollout, Variant, assign, bucket
from tests.helpers.auth import auth, unique
from tests.helpers.requests import GLOBAL, effective_value, field_violations, org, py, set_request, tv, user

ADMIN = auth("admin")
SERVICE = auth("service", "reader")


# --- bucketing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hashed", "expected"),
    [
        ("ejOoVL", 0),
        ("bY9fO-", 0),
        ("SI7p-", 49),
        ("6LvT0", 50),
        ("ceQdGm", 99),
        ("jon@company.com", 36),
        ("user1", 76),
    ],
)
def test_flagd_buckets_out_of_100(hashed: str, expected: int) -> None:
    assert bucket("", hashed, 100) == expected


SUITS = Rollout(tuple(Variant(name, name, 25) for name in ("clubs", "diamonds", "hearts", "spades")), "fractional-flag")


@pytest.mark.parametrize(
    ("user_id", "suit"),
    [("jack", "hearts"), ("queen", "spades"), ("ten", "clubs"), ("nine", "diamonds"), ("3", "clubs")],
)
def test_flagd_testbed_vectors(user_id: str, suit: str) -> None:
    value, assignment = assign(SUITS, "any-key", user_id, "")
    assert (value, assignment.variant, assignment.salt, assignment.total_weight) == (suit, suit, "fractional-flag", 100)


def shares(rollout: Rollout, ids: list[str]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for i in ids:
        value = assign(rollout, "feature.x", i, "")[0]
        counts[value] = counts.get(value, 0) + 1
    return {name: n / len(ids) for name, n in counts.items()}


IDS = [f"user-{n}" for n in range(10_000)]


def test_weights_give_their_share_within_two_percent() -> None:
    assert shares(Rollout((Variant("off", "off", 0), Variant("on", "on", 100))), IDS) == {"on": 1.0}
    assert shares(Rollout((Variant("on", "on", 100), Variant("off", "off", 0))), IDS) == {"on": 1.0}
    half = shares(Rollout((Variant("a", "a", 50), Variant("b", "b", 50))), IDS)
    assert abs(half["a"] - 0.5) <= 0.02 and abs(half["b"] - 0.5) <= 0.02
    thirds = shares(Rollout((Variant("a", "a", 1), Variant("b", "b", 1), Variant("c", "c", 1))), IDS)
    assert all(abs(share - 1 / 3) <= 0.02 for share in thirds.values())


def test_a_weight_change_moves_only_the_ids_whose_bucket_changed_variant() -> None:
    before = Rollout((Variant("a", "a", 50), Variant("b", "b", 50)), salt="exp")
    after = Rollout((Variant("a", "a", 60), Variant("b", "b", 40)), salt="exp")
    moved = [i for i in IDS if assign(before, "k", i, "")[0] != assign(after, "k", i, "")[0]]
    # The total weight is the same, so buckets are: only buckets 50-59 change hands, from b to a.
    assert all(50 <= bucket("exp", i, 100) < 60 for i in moved)
    assert all(assign(before, "k", i, "")[0] == "b" and assign(after, "k", i, "")[0] == "a" for i in moved)
    assert abs(len(moved) / len(IDS) - 0.10) <= 0.02


def test_org_bucketing_gives_every_user_of_an_org_the_same_variant() -> None:
    rollout = Rollout((Variant("a", "a", 50), Variant("b", "b", 50)), bucket_by=BucketBy.ORG_ID)
    assert len({assign(rollout, "k", f"u{n}", "acme")[0] for n in range(200)}) == 1
    assert len({assign(rollout, "k", "u1", f"org-{n}")[0] for n in range(200)}) == 2


# --- through the server ---------------------------------------------------------------------------


def rollout(*variants: tuple[str, Any, int], **fields: Any) -> common_pb2.Rollout:
    return common_pb2.Rollout(
        variants=[common_pb2.RolloutVariant(name=n, value=tv(v), weight=w) for n, v, w in variants], **fields
    )


def rollout_write(
    scope: common_pb2.Scope, key: str, message: common_pb2.Rollout
) -> preferences_pb2.SetPreferencesRequest:
    return preferences_pb2.SetPreferencesRequest(
        scope=scope, writes=[preferences_pb2.PreferenceWrite(key=key, rollout=message)], reason="rollout"
    )


async def effective(stub, user_id: str, org_id: str, key: str) -> preferences_pb2.EffectiveValue:
    value: preferences_pb2.EffectiveValue = await effective_value(stub, user_id, org_id, key, SERVICE)
    return value


async def define(stub, key: str, **fields: Any) -> None:
    definition = preferences_pb2.Definition(key=key, category="tests", type=common_pb2.VALUE_TYPE_STRING, **fields)
    await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)


async def test_a_default_rollout_assigns_each_user_its_variant_with_provenance(stub) -> None:
    key = f"tests.rollout_{unique('k')}"
    await define(stub, key, default_rollout=rollout(("old", "v1", 50), ("new", "v2", 50), salt="checkout"))
    got = await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key=key), metadata=ADMIN)
    assert [v.name for v in got.definition.default_rollout.variants] == ["old", "new"]
    assert not got.definition.HasField("default_value")
    for user_id in ("jack", "queen", "ten", "nine", "user1"):
        value = await effective(stub, user_id, "", key)
        expected_variant = "old" if bucket("checkout", user_id, 100) < 50 else "new"
        assert value.provenance.layer == common_pb2.LAYER_DEFAULT
        assert value.provenance.rollout.variant == expected_variant
        assert value.provenance.rollout.bucket == bucket("checkout", user_id, 100)
        assert py(value.value) == {"old": "v1", "new": "v2"}[expected_variant]


async def test_an_org_rollout_by_org_and_a_user_override_above_it(stub) -> None:
    key = f"tests.rollout_{unique('k')}"
    await define(stub, key, default_value=tv("plain"))
    org_id = unique("o")
    by_org = rollout(("a", "A", 1), ("b", "B", 1), bucket_by=common_pb2.ROLLOUT_BUCKET_BY_ORG_ID)
    await stub.SetPreferences(rollout_write(org(org_id), key, by_org), metadata=ADMIN)
    values = {py((await effective(stub, f"{org_id}-u{n}", org_id, key)).value) for n in range(20)}
    assert len(values) == 1
    first = await effective(stub, f"{org_id}-u0", org_id, key)
    assert first.provenance.layer == common_pb2.LAYER_ORG
    assert first.provenance.rollout.bucket_by == common_pb2.ROLLOUT_BUCKET_BY_ORG_ID
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=org(org_id)), metadata=ADMIN)
    (stored,) = [p for p in listed.preferences if p.key == key]
    assert [v.name for v in stored.rollout.variants] == ["a", "b"] and not stored.HasField("value")
    # A user's own value wins over the org's rollout.
    await stub.SetPreferences(set_request(user(f"{org_id}-u3"), {key: "mine"}), metadata=ADMIN)
    mine = await effective(stub, f"{org_id}-u3", org_id, key)
    assert py(mine.value) == "mine" and not mine.provenance.HasField("rollout")


async def test_bad_rollouts_are_refused_and_write_nothing(stub) -> None:
    key = f"tests.rollout_{unique('k')}"
    await define(stub, key, default_value=tv("plain"), allowed_values=[tv("plain"), tv("x"), tv("y")])
    org_id = unique("o")
    cases: list[tuple[common_pb2.Scope, common_pb2.Rollout, str]] = [
        (org(org_id), rollout(("a", "x", -1), ("b", "y", 1)), "writes[0].rollout.variants[0].weight"),
        (org(org_id), rollout(("a", "x", 0), ("b", "y", 0)), "writes[0].rollout.variants"),
        (org(org_id), rollout(("a", "x", 1), ("b", "z", 1)), "writes[0].rollout"),  # not an allowed value
        (org(org_id), rollout(("a", "x", 1), salt="s" * 129), "writes[0].rollout.salt"),
        (org(org_id), rollout(("a", "x", 1), ("a", "y", 1)), "writes[0].rollout.variants[1].name"),
        (org(org_id), rollout(), "writes[0].rollout.variants"),
        (user(unique("u")), rollout(("a", "x", 1)), "writes[0].rollout"),  # USER scope
        (GLOBAL, rollout(("a", "x", 1), bucket_by=7), "writes[0].rollout.bucket_by"),
    ]
    for scope, message, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SetPreferences(rollout_write(scope, key, message), metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(refused.value), (field, field_violations(refused.value))
    both = rollout_write(org(org_id), key, rollout(("a", "x", 1)))
    both.writes[0].value.CopyFrom(tv("x"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SetPreferences(both, metadata=ADMIN)
    assert "writes[0].rollout" in field_violations(refused.value)
    listed = await stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=org(org_id)), metadata=ADMIN)
    assert [p.key for p in listed.preferences if p.key == key] == []
    assert py((await effective(stub, "someone", org_id, key)).value) == "plain"


async def test_a_weight_change_reaches_the_watchers_of_moved_users(stub) -> None:
    key = f"tests.rollout_{unique('k')}"
    await define(stub, key, default_value=tv("plain"))
    org_id = unique("o")
    await stub.SetPreferences(rollout_write(org(org_id), key, rollout(("a", "A", 50), ("b", "B", 50))), metadata=ADMIN)
    users = [f"{org_id}-{n}" for n in range(40)]
    # A user whose bucket moves from b to a when the weights become 100/0.
    moving = next(u for u in users if bucket(key, u, 100) >= 50)
    assert py((await effective(stub, moving, org_id, key)).value) == "B"
    watch = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(
            subject=common_pb2.Subject(user_id=moving, org_id=org_id), key_prefixes=[key]
        ),
        metadata=ADMIN,
    )
    assert (await watch.read()).HasField("started")
    await stub.SetPreferences(rollout_write(org(org_id), key, rollout(("a", "A", 100), ("b", "B", 0))), metadata=ADMIN)
    async with asyncio.timeout(10):
        message = await watch.read()
        while not message.HasField("change"):
            message = await watch.read()
    watch.cancel()
    assert py(message.change.effective.value) == "A"
    assert message.change.effective.provenance.rollout.variant == "a"
    assert py((await effective(stub, moving, org_id, key)).value) == "A"
