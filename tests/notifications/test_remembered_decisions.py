"""Remembered decisions over real gRPC: a repeated question is answered as a fresh one would be, whatever data
it carries, and a change made through another process reaches the next answer once that process has seen it."""

from __future__ import annotations

import asyncio

import grpc

from prefd.v1 import common_pb2, notifications_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from tests.helpers.auth import unique
from tests.helpers.processes import prefd_process
from tests.helpers.requests import set_request, user
from tests.helpers.settings import process_env
from tests.notifications.test_service import ADMIN, SERVICE, N, actions, decide_request, event

RULES = {"LARGE_LOSS": {"enabled": True, "channels": ["EMAIL", "IN_APP"], "conditions": {"loss": {"min": 1000}}}}
CHANNELS = [N.CHANNEL_EMAIL, N.CHANNEL_IN_APP]


async def test_a_repeated_question_gets_the_answer_its_data_calls_for(stub, notify) -> None:
    user_id = unique("u")
    await stub.SetPreferences(set_request(user(user_id), {"notifications.event_rules": RULES}), metadata=ADMIN)

    async def email(data: dict[str, object]) -> tuple[str, str]:
        request = decide_request(user_id, event=event(data=data, channels=CHANNELS))
        return actions((await notify.Decide(request, metadata=SERVICE)).decision)["EMAIL"]

    sent, unmet = ("SEND_NOW", "ALLOWED"), ("SUPPRESS", "CONDITION_NOT_MET")
    for _ in range(2):  # the second round asks questions already answered
        assert await email({"loss": 2500}) == sent
        assert await email({"loss": 10}) == unmet
        assert await email({"symbol": "ACME"}) == unmet  # the path is absent
        assert await email({"loss": 2500, "symbol": "ACME", "order": {"id": 7}}) == sent
        assert await email({"loss": "2500"}) == unmet  # a string is not a number
    # A USER write of this process reaches the very next answer.
    await stub.SetPreferences(set_request(user(user_id), {"notifications.email.enabled": False}), metadata=ADMIN)
    assert await email({"loss": 2500}) == ("SUPPRESS", "CHANNEL_DISABLED")


async def test_a_change_through_another_process_reaches_the_next_answer(stub, notify, database_url: str) -> None:
    user_id = unique("u")
    await stub.SetPreferences(set_request(user(user_id), {"notifications.event_rules": RULES}), metadata=ADMIN)
    env = process_env(database_url)
    async with prefd_process(env) as (_, port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            other = notifications_pb2_grpc.NotificationServiceStub(channel)
            request = decide_request(user_id, event=event(data={"loss": 2500}, channels=CHANNELS))
            for _ in range(2):  # asked twice: the second answer is the remembered one
                first = await other.Decide(request, metadata=SERVICE)
                assert actions(first.decision)["EMAIL"] == ("SEND_NOW", "ALLOWED")
            watch = preferences_pb2_grpc.PreferencesServiceStub(channel).WatchPreferences(
                preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=user_id)), metadata=ADMIN
            )
            assert (await watch.read()).HasField("started")
            # Written through the test's server; the other process learns of it from the change feed.
            await stub.SetPreferences(
                set_request(user(user_id), {"notifications.email.enabled": False}), metadata=ADMIN
            )
            async with asyncio.timeout(10):
                message = await watch.read()
                while not message.HasField("change"):
                    message = await watch.read()
            watch.cancel()
            # A watcher sees a change only after the process's caches (the decision memo among them) dropped
            # what it touched.
            after = await other.Decide(request, metadata=SERVICE)
            assert actions(after.decision)["EMAIL"] == ("SUPPRESS", "CHANNEL_DISABLED")
            assert actions(after.decision)["IN_APP"] == ("SEND_NOW", "ALLOWED")
