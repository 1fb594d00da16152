"""NotificationService over real gRPC, PostgreSQL and Redis: decisions, their trace, throttles and consents."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, notifications_pb2, notifications_pb2_grpc
from tests.helpers.auth import auth, unique
from tests.helpers.processes import prefd_process
from tests.helpers.requests import error_reason, field_violations, org, set_request, user
from tests.helpers.settings import process_env

N = notifications_pb2
ADMIN = auth("admin")
SERVICE = auth("service", "notifier")


def event(event_type: str = "LARGE_LOSS", category: str = "trading", **kwargs: Any) -> notifications_pb2.Event:
    data = kwargs.pop("data", None)
    message = N.Event(event_type=event_type, category=category, **kwargs)
    if data is not None:
        message.data.update(data)
    return message


def decide_request(user_id: str, org_id: str = "", **kwargs: Any) -> notifications_pb2.DecideRequest:
    return N.DecideRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id), **kwargs)


def actions(decision: notifications_pb2.Decision) -> dict[str, tuple[str, str]]:
    """Channel name -> (action, reason) names."""
    return {
        N.Channel.Name(c.channel).removeprefix("CHANNEL_"): (
            N.Action.Name(c.action).removeprefix("ACTION_"),
            N.Reason.Name(c.reason).removeprefix("REASON_"),
        )
        for c in decision.channels
    }


def at(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_an_org_event_rule_decides_for_every_user_of_the_org_with_its_layer_in_the_trace(stub, notify) -> None:
    org_id = unique("o")
    alice, bob = unique("u"), unique("u")
    rules = {"LARGE_LOSS": {"enabled": True, "channels": ["EMAIL", "PUSH"], "conditions": {"loss": {"min": 1000}}}}
    reply = await stub.SetPreferences(set_request(org(org_id), {"notifications.event_rules": rules}), metadata=ADMIN)
    version = reply.changes[0].new_version
    request = event(data={"loss": 2500}, channels=[N.CHANNEL_EMAIL, N.CHANNEL_SMS, N.CHANNEL_PUSH])
    for user_id in (alice, bob):
        decision = (await notify.Decide(decide_request(user_id, org_id, event=request), metadata=SERVICE)).decision
        assert actions(decision) == {
            "EMAIL": ("SEND_NOW", "ALLOWED"),
            "SMS": ("SUPPRESS", "EVENT_DISABLED"),
            "PUSH": ("SUPPRESS", "CHANNEL_DISABLED"),  # push is off by default
        }
        sms = next(c for c in decision.channels if c.channel == N.CHANNEL_SMS)
        deciding = [s for s in sms.trace if s.key == "notifications.event_rules"]
        assert deciding and deciding[-1].provenance.layer == common_pb2.LAYER_ORG
        assert deciding[-1].provenance.version == version
    # One ORG write changes the next decision of every user of the org, with no USER write.
    stricter = {"LARGE_LOSS": {"enabled": True, "conditions": {"loss": {"min": 5000}}}}
    await stub.SetPreferences(set_request(org(org_id), {"notifications.event_rules": stricter}), metadata=ADMIN)
    for user_id in (alice, bob):
        decision = (await notify.Decide(decide_request(user_id, org_id, event=request), metadata=SERVICE)).decision
        assert {a for a, _ in actions(decision).values()} == {"SUPPRESS"}
        assert actions(decision)["EMAIL"] == ("SUPPRESS", "CONDITION_NOT_MET")


async def test_quiet_hours_defer_to_their_end_and_critical_goes_now(stub, notify) -> None:
    user_id = unique("u")
    settings = {
        "locale.timezone": "Europe/Berlin",
        "notifications.quiet_hours.enabled": True,
        "notifications.quiet_hours.start": "22:00",
        "notifications.quiet_hours.end": "07:00",
    }
    await stub.SetPreferences(set_request(user(user_id), settings), metadata=ADMIN)
    # 23:30 in Berlin on 2026-03-28, the night clocks go forward: the window ends 07:00 CEST = 05:00 UTC.
    night = datetime(2026, 3, 28, 22, 30, tzinfo=UTC)
    request = event("PRICE_ALERT", "trading", at=at(night), channels=[N.CHANNEL_EMAIL, N.CHANNEL_IN_APP])
    decision = (await notify.Decide(decide_request(user_id, event=request), metadata=SERVICE)).decision
    assert actions(decision) == {"EMAIL": ("DEFER", "QUIET_HOURS"), "IN_APP": ("SEND_NOW", "ALLOWED")}
    email = decision.channels[0]
    assert email.deliver_after.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 29, 5, 0, tzinfo=UTC)
    critical = event("PRICE_ALERT", "trading", at=at(night), priority=N.PRIORITY_CRITICAL, channels=[N.CHANNEL_EMAIL])
    decision = (await notify.Decide(decide_request(user_id, event=critical), metadata=SERVICE)).decision
    assert actions(decision) == {"EMAIL": ("SEND_NOW", "CRITICAL_BYPASS")}


async def test_consent_lifecycle_gates_a_category_even_for_critical(stub, notify, channel) -> None:
    user_id = unique("u")
    purpose = "marketing_email"
    await stub.SetPreferences(
        set_request(user(user_id), {"notifications.consent_purposes": {"promotions": purpose}}), metadata=ADMIN
    )
    mine = auth("user", user_id)
    promo = event("NEW_OFFER", "promotions", priority=N.PRIORITY_CRITICAL, channels=[N.CHANNEL_EMAIL])

    async def email() -> tuple[str, str]:
        decision = (await notify.Decide(decide_request(user_id, event=promo), metadata=mine)).decision
        return actions(decision)["EMAIL"]

    assert await email() == ("SUPPRESS", "CONSENT_MISSING")
    granted = await notify.GrantConsent(
        N.GrantConsentRequest(
            user_id=user_id, purpose=purpose, legal_basis=N.LEGAL_BASIS_CONSENT, source="settings", notice_version="v3"
        ),
        metadata=mine,
    )
    assert granted.consent.status == N.CONSENT_STATUS_GRANTED and granted.consent.actor == user_id
    assert await email() == ("SEND_NOW", "ALLOWED")
    await notify.WithdrawConsent(N.WithdrawConsentRequest(user_id=user_id, purpose=purpose), metadata=mine)
    assert await email() == ("SUPPRESS", "CONSENT_WITHDRAWN")
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await notify.WithdrawConsent(N.WithdrawConsentRequest(user_id=user_id, purpose=purpose), metadata=mine)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A grant that expires before the event is sent counts as expired.
    soon = datetime.now(UTC) + timedelta(minutes=5)
    await notify.GrantConsent(
        N.GrantConsentRequest(
            user_id=user_id, purpose=purpose, legal_basis=N.LEGAL_BASIS_CONSENT, source="s", expires_at=at(soon)
        ),
        metadata=mine,
    )
    later = event("NEW_OFFER", "promotions", channels=[N.CHANNEL_EMAIL], at=at(soon + timedelta(hours=1)))
    decision = (await notify.Decide(decide_request(user_id, event=later), metadata=mine)).decision
    assert actions(decision)["EMAIL"] == ("SUPPRESS", "CONSENT_EXPIRED")
    history = await notify.ListConsentHistory(N.ListConsentHistoryRequest(user_id=user_id, page_size=2), metadata=mine)
    assert [e.status for e in history.entries] == [N.CONSENT_STATUS_GRANTED, N.CONSENT_STATUS_WITHDRAWN]
    assert history.next_page_token
    rest = await notify.ListConsentHistory(
        N.ListConsentHistoryRequest(user_id=user_id, page_size=2, page_token=history.next_page_token), metadata=mine
    )
    assert [e.status for e in rest.entries] == [N.CONSENT_STATUS_GRANTED] and not rest.next_page_token
    # The ledger is in the user's export, as change rows of kind consent.
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    exported = json.loads(
        (await audit.ExportUserData(audit_pb2.ExportUserDataRequest(user_id=user_id), metadata=mine)).json
    )
    assert len(exported["consents"]) == 3
    changes = await audit.ListChanges(
        audit_pb2.ListChangesRequest(scope=user(user_id), kinds=[common_pb2.CHANGE_KIND_CONSENT]), metadata=ADMIN
    )
    assert len(changes.changes) == 3


async def test_a_retried_decide_charges_the_throttle_once(stub, notify) -> None:
    user_id = unique("u")
    rules = {"ORDER_FILLED": {"enabled": True, "throttle_minutes": 60, "throttle_limit": 1}}
    await stub.SetPreferences(set_request(user(user_id), {"notifications.event_rules": rules}), metadata=ADMIN)
    filled = event("ORDER_FILLED", "trading", channels=[N.CHANNEL_EMAIL])
    first = await notify.Decide(
        decide_request(user_id, event=filled, consume=True, idempotency_key="k1"), metadata=SERVICE
    )
    retry = await notify.Decide(
        decide_request(user_id, event=filled, consume=True, idempotency_key="k1"), metadata=SERVICE
    )
    assert actions(first.decision)["EMAIL"] == actions(retry.decision)["EMAIL"] == ("SEND_NOW", "ALLOWED")
    assert first.decision.throttle.remaining == 0 and first.decision.throttle.limit == 1
    dry = await notify.Decide(decide_request(user_id, event=filled), metadata=SERVICE)
    assert actions(dry.decision)["EMAIL"] == ("SUPPRESS", "THROTTLED")
    other = await notify.Decide(
        decide_request(user_id, event=filled, consume=True, idempotency_key="k2"), metadata=SERVICE
    )
    assert actions(other.decision)["EMAIL"] == ("SUPPRESS", "THROTTLED")


async def test_bad_requests_are_refused_and_charge_nothing(notify) -> None:
    alice = unique("u")
    as_alice = auth("user", alice)
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await notify.Decide(decide_request(unique("u"), event=event()), metadata=as_alice)
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    cases: list[tuple[notifications_pb2.DecideRequest, str]] = [
        (decide_request(alice, event=event(event_type="")), "event.event_type"),
        (decide_request(alice, event=event(category="c" * 129)), "event.category"),
        (decide_request(alice, event=event(channels=[99])), "event.channels[0]"),  # type: ignore[list-item]
        (decide_request(alice, event=event(priority=9)), "event.priority"),  # type: ignore[arg-type]
        (decide_request(alice, event=event(at=at(datetime.now(UTC) + timedelta(days=400)))), "event.at"),
        (decide_request(alice, event=event(data={"blob": "x" * 70_000})), "event.data"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await notify.Decide(request, metadata=as_alice)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert any(v.startswith(field) for v in field_violations(refused.value)), (
            field,
            field_violations(refused.value),
        )
    too_many = N.DecideBatchRequest(subjects=[common_pb2.Subject(user_id=f"u{i}") for i in range(1001)], event=event())
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await notify.DecideBatch(too_many, metadata=SERVICE)
    assert batch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as purpose:
        await notify.GrantConsent(
            N.GrantConsentRequest(user_id=alice, purpose="no_such_purpose", legal_basis=N.LEGAL_BASIS_CONSENT),
            metadata=as_alice,
        )
    assert purpose.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as for_other:
        await notify.GrantConsent(
            N.GrantConsentRequest(user_id=unique("u"), purpose="marketing_email", legal_basis=N.LEGAL_BASIS_CONSENT),
            metadata=as_alice,
        )
    assert for_other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await notify.ListConsents(N.ListConsentsRequest(user_id=alice), metadata=as_alice)
    assert not listed.consents


async def test_a_malformed_condition_is_refused_when_written(stub) -> None:
    bad = {"LARGE_LOSS": {"conditions": {"loss..amount": {"min": 1}}}}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SetPreferences(set_request(user(unique("u")), {"notifications.event_rules": bad}), metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == "INVALID_ARGUMENT"


async def test_decide_batch_answers_each_recipient_in_order(stub, notify) -> None:
    org_id = unique("o")
    users = [unique("u") for _ in range(50)]
    await stub.SetPreferences(set_request(user(users[7]), {"notifications.email.enabled": False}), metadata=ADMIN)
    reply = await notify.DecideBatch(
        N.DecideBatchRequest(
            subjects=[common_pb2.Subject(user_id=u, org_id=org_id) for u in users],
            event=event("generation_complete", "generation_complete", channels=[N.CHANNEL_EMAIL]),
        ),
        metadata=SERVICE,
    )
    assert [d.subject.user_id for d in reply.decisions] == users
    outcomes = [actions(d)["EMAIL"] for d in reply.decisions]
    assert outcomes[7] == ("SUPPRESS", "CHANNEL_DISABLED")
    assert Counter(outcomes) == {("SEND_NOW", "ALLOWED"): 49, ("SUPPRESS", "CHANNEL_DISABLED"): 1}
    # Recipients sharing an evaluation still get digest keys of their own.
    await stub.SetPreferences(
        set_request(org(org_id), {"notifications.category_frequency": {"generation_complete": "daily"}}), metadata=ADMIN
    )
    digested = await notify.DecideBatch(
        N.DecideBatchRequest(
            subjects=[common_pb2.Subject(user_id=u, org_id=org_id) for u in users[:3]],
            event=event("generation_complete", "generation_complete", channels=[N.CHANNEL_IN_APP]),
        ),
        metadata=SERVICE,
    )
    keys = [d.channels[0].digest_key for d in digested.decisions]
    assert [actions(d)["IN_APP"] for d in digested.decisions] == [("DIGEST", "DIGEST")] * 3
    assert len(set(keys)) == 3 and all(keys)


async def test_two_processes_sharing_redis_send_exactly_the_limit(stub, database_url: str) -> None:
    """200 concurrent consuming Decides for one user and event over two server processes: exactly 5 sent.

    The processes share REDIS_URL's Redis when it is set, else PostgreSQL's throttle rows: exact either way."""
    user_id = unique("u")
    env = process_env(database_url)
    rules = {"BIG_MOVE": {"enabled": True, "throttle_minutes": 60, "throttle_limit": 5}}
    # Stored before the processes start, so each reads it with its first decision.
    await stub.SetPreferences(set_request(user(user_id), {"notifications.event_rules": rules}), metadata=ADMIN)
    async with prefd_process(env) as (_, first_port, _), prefd_process(env) as (_, second_port, _):
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in (first_port, second_port)]
        try:
            stubs = [notifications_pb2_grpc.NotificationServiceStub(c) for c in channels]
            move = event("BIG_MOVE", "trading", channels=[N.CHANNEL_IN_APP])

            async def one(i: int) -> str:
                request = decide_request(user_id, event=move, consume=True, idempotency_key=f"call-{i}")
                reply = await stubs[i % 2].Decide(request, metadata=SERVICE, timeout=30)
                return actions(reply.decision)["IN_APP"][0]

            replies = [await s.Decide(decide_request(user_id, event=move), metadata=SERVICE) for s in stubs]
            assert [r.decision.throttle.limit for r in replies] == [5, 5]
            outcomes = Counter(await asyncio.gather(*(one(i) for i in range(200))))
            assert outcomes == {"SEND_NOW": 5, "SUPPRESS": 195}
            retried = Counter(await asyncio.gather(*(one(i) for i in range(200))))
            assert retried == outcomes  # every retry gets its first answer; nothing charged twice
        finally:
            for c in channels:
                await c.close()
