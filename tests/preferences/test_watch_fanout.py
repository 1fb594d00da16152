"""One ORG change, many subject watchers: each watcher hears it with its own effective value and provenance,
even though watchers whose values are the same share one resolution and one serialized message."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.preferences.rollout import bucket
from tests.helpers.auth import auth, unique
from tests.helpers.requests import org, py, set_request, tv, user

ADMIN = auth("admin")
SERVICE = auth("service", "reader")
USERS = 16


async def watch_all(stub: preferences_pb2_grpc.PreferencesServiceStub, users: list[str], org_id: str) -> list[Any]:
    calls = []
    for user_id in users:
        call = stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id)),
            metadata=SERVICE,
        )
        assert (await call.read()).WhichOneof("message") == "started"
        calls.append(call)
    return calls


async def next_change(call: Any) -> preferences_pb2.ChangeEvent:
    async with asyncio.timeout(10):
        while True:
            message = await call.read()
            if message.WhichOneof("message") == "change":
                return message.change


async def test_an_org_change_reaches_every_watcher_with_its_own_value(channel: grpc.aio.Channel) -> None:
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    key = f"tests.fanout_{unique('k')}"
    definition = preferences_pb2.Definition(
        key=key, category="tests", type=common_pb2.VALUE_TYPE_STRING, default_value=tv("plain")
    )
    await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    org_id = unique("o")
    users = [f"{org_id}-u{n}" for n in range(USERS)]
    own = users[3]
    await stub.SetPreferences(set_request(user(own), {key: "mine"}), metadata=ADMIN)
    calls = await watch_all(stub, users, org_id)
    try:
        # A 50/50 rollout by user at the org: each watcher gets the variant of its own user.
        split = common_pb2.Rollout(
            variants=[
                common_pb2.RolloutVariant(name="a", value=tv("A"), weight=50),
                common_pb2.RolloutVariant(name="b", value=tv("B"), weight=50),
            ],
            salt="fanout",
        )
        write = preferences_pb2.PreferenceWrite(key=key, rollout=split)
        await stub.SetPreferences(
            preferences_pb2.SetPreferencesRequest(scope=org(org_id), writes=[write], reason="split"), metadata=ADMIN
        )
        heard = await asyncio.gather(*(next_change(call) for call in calls))
        variants = set()
        for user_id, change in zip(users, heard, strict=True):
            assert (change.scope.id, change.key, change.version) == (org_id, key, 1)
            if user_id == own:
                assert py(change.effective.value) == "mine"
                assert change.effective.provenance.layer == common_pb2.LAYER_USER
                continue
            variant = "a" if bucket("fanout", user_id, 100) < 50 else "b"
            variants.add(variant)
            assert change.effective.provenance.rollout.variant == variant, user_id
            assert py(change.effective.value) == variant.upper()
            assert change.effective.provenance.layer == common_pb2.LAYER_ORG
        assert variants == {"a", "b"}  # the users chosen fall on both sides of the split

        # A plain org value: every watcher without its own value gets it; the user with one keeps it.
        await stub.SetPreferences(set_request(org(org_id), {key: "org-wide"}), metadata=ADMIN)
        heard = await asyncio.gather(*(next_change(call) for call in calls))
        for user_id, change in zip(users, heard, strict=True):
            assert change.version == 2
            expected = ("mine", common_pb2.LAYER_USER) if user_id == own else ("org-wide", common_pb2.LAYER_ORG)
            assert (py(change.effective.value), change.effective.provenance.layer) == expected
            assert not change.effective.provenance.HasField("rollout")
        # The same cursor for everyone: it names the change, not the watcher.
        assert len({change.cursor.token for change in heard}) == 1
    finally:
        for call in calls:
            call.cancel()
