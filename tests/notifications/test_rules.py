"""The notification decision: every reason, the rule order, CRITICAL, throttles, event-rule validation, traces."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefd_server.kernel.model import Layer, ResolvedValue, Scope, ScopeKind, Subject
from prefd_server.notifications.model import (
    ALL_CHANNELS,
    Action,
    Channel,
    ConsentEntry,
    ConsentStatus,
    Decision,
    Event,
    LegalBasis,
    Priority,
    Reason,
    ThrottleRule,
    ThrottleState,
)
from prefd_server.notifications.rules import Evaluation, evaluate, event_rules_problems, finish

SUBJECT = Subject("u1", "o1")
AT = datetime(2024, 6, 5, 12, 0, tzinfo=UTC)  # a Wednesday
SCOPES = {
    Layer.GLOBAL: Scope(ScopeKind.GLOBAL),
    Layer.ORG: Scope(ScopeKind.ORG, "o1"),
    Layer.USER: Scope(ScopeKind.USER, "u1"),
}
SEED_RULES = {
    "LARGE_LOSS": {
        "enabled": True,
        "channels": ["EMAIL", "SMS", "PUSH"],
        "priority": "HIGH",
        "throttle_minutes": 60,
        "throttle_limit": 1,
        "conditions": {"loss_amount": {"min": 1000}},
    }
}


def resolved(key: str, value: Any, layer: Layer = Layer.USER, version: int = 3) -> ResolvedValue:
    return ResolvedValue(key, value, layer, SCOPES.get(layer), version, AT, "tester")


def settings_of(values: dict[str, Any], layer: Layer = Layer.USER) -> dict[str, ResolvedValue]:
    return {key: resolved(key, value, layer) for key, value in values.items()}


def make_event(**changes: Any) -> Event:
    base = Event("LARGE_LOSS", "trading", None, {"loss_amount": 5000}, AT, ALL_CHANNELS)
    return replace(base, **changes)


def decide(
    values: dict[str, Any] | None = None,
    consents: dict[str, ConsentEntry] | None = None,
    allowed: bool = True,
    now: datetime = AT,
    **event: Any,
) -> Decision:
    evaluation = evaluate(SUBJECT, make_event(**event), settings_of(values or {}), consents or {}, now)
    decision = finish(evaluation, allowed, ThrottleState())
    return decision


def answer(decision: Decision, channel: Channel) -> tuple[Action, Reason]:
    found = next(c for c in decision.channels if c.channel is channel)
    return found.action, found.reason


def test_without_settings_everything_is_allowed_but_addresses_are_missing() -> None:
    decision = decide()
    assert decision.priority is Priority.MEDIUM
    for channel in (Channel.EMAIL, Channel.PUSH, Channel.IN_APP):
        assert answer(decision, channel) == (Action.SEND_NOW, Reason.ALLOWED)
    for channel in (Channel.SMS, Channel.WEBHOOK, Channel.VOICE):
        assert answer(decision, channel) == (Action.SUPPRESS, Reason.NO_ADDRESS)
    assert [c.channel for c in decision.channels] == list(ALL_CHANNELS)


def test_addresses() -> None:
    decision = decide(
        {
            "notifications.sms.phone_number": "+15550100",
            "notifications.webhook.url": "  ",
            "notifications.voice.phone_number": "+1",
        }
    )
    assert answer(decision, Channel.SMS) == (Action.SEND_NOW, Reason.ALLOWED)
    assert answer(decision, Channel.WEBHOOK) == (Action.SUPPRESS, Reason.NO_ADDRESS)
    assert answer(decision, Channel.VOICE) == (Action.SEND_NOW, Reason.ALLOWED)


def test_event_rule_enabled_channels_and_conditions() -> None:
    rules = {"notifications.event_rules": SEED_RULES, "notifications.sms.phone_number": "+15550100"}
    decision = decide(rules)
    assert decision.priority is Priority.HIGH
    assert answer(decision, Channel.SMS) == (Action.SEND_NOW, Reason.ALLOWED)
    assert answer(decision, Channel.IN_APP) == (Action.SUPPRESS, Reason.EVENT_DISABLED)
    small = decide(rules, data={"loss_amount": 500})
    assert answer(small, Channel.EMAIL) == (Action.SUPPRESS, Reason.CONDITION_NOT_MET)
    assert small.channels[0].trace[-1].outcome == "loss_amount = 500 is below min 1000"
    disabled = {"LARGE_LOSS": {**SEED_RULES["LARGE_LOSS"], "enabled": False}}
    assert {answer(decide({"notifications.event_rules": disabled}), c)[1] for c in ALL_CHANNELS} == {
        Reason.EVENT_DISABLED
    }
    # the rule order: a disabled event wins over a failing condition and a disabled channel
    both = decide({"notifications.event_rules": disabled, "notifications.email.enabled": False}, data={})
    assert answer(both, Channel.EMAIL) == (Action.SUPPRESS, Reason.EVENT_DISABLED)
    # an event type without a rule: allowed, no conditions, no throttle
    other = evaluate(SUBJECT, make_event(event_type="TRADE_EXECUTED"), settings_of(rules), {}, AT)
    assert other.throttle is None and answer(finish(other, True, ThrottleState()), Channel.IN_APP)[0] is Action.SEND_NOW


def test_malformed_stored_conditions_count_as_not_met_and_are_traced() -> None:
    bad = {"LARGE_LOSS": {"conditions": {"loss amount": {"min": 1}}}}
    decision = decide({"notifications.event_rules": bad})
    assert answer(decision, Channel.EMAIL) == (Action.SUPPRESS, Reason.CONDITION_NOT_MET)
    assert decision.channels[0].trace[-1].outcome.startswith("malformed condition")
    assert decision.trace[0].outcome.startswith("malformed rule for LARGE_LOSS")
    assert decide({"notifications.event_rules": {"LARGE_LOSS": "nope"}}).channels[0].reason is Reason.EVENT_DISABLED
    assert (
        decide({"notifications.event_rules": ["nope"]}).channels[0].reason is Reason.ALLOWED
    )  # not an object: no rules


def test_channel_and_category_switches() -> None:
    assert answer(decide({"notifications.email.enabled": False}), Channel.EMAIL) == (
        Action.SUPPRESS,
        Reason.CHANNEL_DISABLED,
    )
    off = decide({"notifications.categories.trading": False})
    assert {c.reason for c in off.channels} == {Reason.CATEGORY_DISABLED}
    table = {"notifications.category_channels": {"trading": {"PUSH": False, "EMAIL": True}, "news": {"EMAIL": False}}}
    decision = decide(table)
    assert answer(decision, Channel.PUSH) == (Action.SUPPRESS, Reason.CATEGORY_DISABLED)
    assert answer(decision, Channel.EMAIL) == (Action.SEND_NOW, Reason.ALLOWED)
    # a disabled channel is checked before the category
    both = decide({"notifications.email.enabled": False, "notifications.categories.trading": False})
    assert answer(both, Channel.EMAIL)[1] is Reason.CHANNEL_DISABLED


def consent(status: ConsentStatus, expires_at: datetime | None = None) -> ConsentEntry:
    return ConsentEntry("u1", "marketing_email", LegalBasis.CONSENT, status, expires_at=expires_at, entry_id=42)


@pytest.mark.parametrize("priority", [None, Priority.CRITICAL])
def test_consent_is_never_bypassed(priority: Priority | None) -> None:
    needs = {"notifications.consent_purposes": {"trading": "marketing_email"}}
    cases = [
        ({}, Reason.CONSENT_MISSING),
        ({"marketing_email": consent(ConsentStatus.WITHDRAWN)}, Reason.CONSENT_WITHDRAWN),
        ({"marketing_email": consent(ConsentStatus.EXPIRED)}, Reason.CONSENT_EXPIRED),
        ({"marketing_email": consent(ConsentStatus.GRANTED, AT - timedelta(seconds=1))}, Reason.CONSENT_EXPIRED),
        ({"other": consent(ConsentStatus.GRANTED)}, Reason.CONSENT_MISSING),
    ]
    for consents, reason in cases:
        decision = decide(needs, consents, priority=priority)
        assert answer(decision, Channel.EMAIL) == (Action.SUPPRESS, reason)
        assert decision.channels[0].trace[-1].key == "notifications.consent_purposes"
    granted = {"marketing_email": consent(ConsentStatus.GRANTED, AT + timedelta(days=1))}
    assert answer(decide(needs, granted, priority=priority), Channel.EMAIL)[0] is Action.SEND_NOW
    # expired by the time the send happens (now), though valid at the event's time
    later = decide(needs, granted, now=AT + timedelta(days=2), priority=priority)
    assert answer(later, Channel.EMAIL) == (Action.SUPPRESS, Reason.CONSENT_EXPIRED)
    # a category not listed needs no consent
    assert answer(decide(needs, category="system_alerts", priority=priority), Channel.EMAIL)[0] is Action.SEND_NOW


QUIET_ON = {
    "notifications.quiet_hours.enabled": True,
    "notifications.quiet_hours.start": "22:00",
    "notifications.quiet_hours.end": "07:00",
    "locale.timezone": "America/New_York",
}
NIGHT = datetime(2024, 6, 5, 4, 0, tzinfo=UTC)  # 00:00 in New York


def test_quiet_hours_defer_except_in_app() -> None:
    decision = decide(QUIET_ON, at=NIGHT)
    email = decision.channels[0]
    assert (email.action, email.reason) == (Action.DEFER, Reason.QUIET_HOURS)
    assert email.deliver_after == datetime(2024, 6, 5, 11, 0, tzinfo=UTC)
    assert answer(decision, Channel.IN_APP) == (Action.SEND_NOW, Reason.ALLOWED)
    deferred = decide({**QUIET_ON, "notifications.quiet_hours.defer_in_app": True}, at=NIGHT)
    assert answer(deferred, Channel.IN_APP) == (Action.DEFER, Reason.QUIET_HOURS)
    assert answer(decide(QUIET_ON, at=AT), Channel.EMAIL) == (Action.SEND_NOW, Reason.ALLOWED)
    not_tonight = decide({**QUIET_ON, "notifications.quiet_hours.days": ["MON"]}, at=NIGHT)
    assert answer(not_tonight, Channel.EMAIL)[0] is Action.SEND_NOW
    malformed = decide({**QUIET_ON, "notifications.quiet_hours.start": "10pm"}, at=NIGHT)
    assert answer(malformed, Channel.EMAIL)[0] is Action.SEND_NOW
    assert "malformed window" in malformed.channels[0].trace[-2].outcome


def test_unknown_timezone_falls_back_to_utc_in_the_trace() -> None:
    decision = decide({**QUIET_ON, "locale.timezone": "Mars/Olympus"}, at=NIGHT)  # 04:00 UTC: still quiet
    assert decision.channels[0].deliver_after == datetime(2024, 6, 5, 7, 0, tzinfo=UTC)
    step = next(s for s in decision.trace if s.rule == "timezone")
    assert step.outcome == "unknown zone 'Mars/Olympus': UTC"
    assert step.key == "locale.timezone" and step.source is not None and step.source.layer is Layer.USER


def test_digest() -> None:
    daily = {
        "notifications.frequency": "daily",
        "locale.timezone": "Europe/Berlin",
        "notifications.digest.time": "08:30",
    }
    decision = decide(daily)
    email = decision.channels[0]
    assert (email.action, email.reason) == (Action.DIGEST, Reason.DIGEST)
    assert email.deliver_after == datetime(2024, 6, 6, 6, 30, tzinfo=UTC)
    assert email.digest_key and email.digest_key == decision.channels[2].digest_key
    assert email.trace[-1].key == "notifications.frequency"
    # a category's own frequency overrides the default, and says so
    own = decide({**daily, "notifications.category_frequency": {"trading": "immediate"}})
    assert own.channels[0].action is Action.SEND_NOW
    assert own.channels[0].trace[-1].key == "notifications.category_frequency"
    weekly = decide({**daily, "notifications.frequency": "weekly", "notifications.digest.weekday": "FRI"})
    assert weekly.channels[0].deliver_after == datetime(2024, 6, 7, 6, 30, tzinfo=UTC)
    # quiet hours come first
    both = decide({**QUIET_ON, "notifications.frequency": "hourly"}, at=NIGHT)
    assert both.channels[0].reason is Reason.QUIET_HOURS
    assert answer(both, Channel.IN_APP) == (Action.DIGEST, Reason.DIGEST)


def throttled_rules(priority: str = "HIGH", limit: int = 2) -> dict[str, Any]:
    rule = {**SEED_RULES["LARGE_LOSS"], "channels": ["EMAIL", "PUSH", "IN_APP"], "priority": priority}
    return {"notifications.event_rules": {"LARGE_LOSS": {**rule, "throttle_limit": limit}}}


def test_throttle_suppresses_every_channel_sent_now() -> None:
    values = {**throttled_rules(), **QUIET_ON}
    evaluation = evaluate(SUBJECT, make_event(at=NIGHT), settings_of(values), {}, NIGHT)
    assert evaluation.throttle == ThrottleRule(limit=2, window_s=3600)
    assert evaluation.needs_throttle
    state = ThrottleState(limit=2, remaining=0, resets_at=NIGHT + timedelta(minutes=30), store="redis")
    decision = finish(evaluation, False, state)
    assert answer(decision, Channel.IN_APP) == (Action.SUPPRESS, Reason.THROTTLED)
    assert answer(decision, Channel.EMAIL) == (Action.DEFER, Reason.QUIET_HOURS)  # deferred: not throttled
    assert decision.throttle == state
    assert decision.trace[-1].rule == "throttle" and "exceeded" in decision.trace[-1].outcome
    assert decision.trace[-1].source is not None and decision.trace[-1].source.version == 3
    allowed = finish(evaluation, True, replace(state, remaining=1))
    assert answer(allowed, Channel.IN_APP) == (Action.SEND_NOW, Reason.ALLOWED)
    assert "1 left" in allowed.channels[3].trace[-1].outcome
    # nothing sent now: nothing to charge
    quiet = evaluate(SUBJECT, make_event(at=NIGHT, channels=(Channel.EMAIL,)), settings_of(values), {}, NIGHT)
    assert quiet.throttle is not None and not quiet.needs_throttle
    assert finish(quiet, False, ThrottleState()).channels[0].action is Action.DEFER


def test_critical_bypasses_quiet_hours_digest_and_throttle_when_configured() -> None:
    values = {**throttled_rules("CRITICAL"), **QUIET_ON, "notifications.frequency": "daily"}
    evaluation = evaluate(SUBJECT, make_event(at=NIGHT), settings_of(values), {}, NIGHT)
    assert evaluation.priority is Priority.CRITICAL
    assert evaluation.throttle is None and not evaluation.needs_throttle
    decision = finish(evaluation, False, ThrottleState())
    for channel in (Channel.EMAIL, Channel.PUSH, Channel.IN_APP):
        assert answer(decision, channel) == (Action.SEND_NOW, Reason.CRITICAL_BYPASS)
    assert decision.channels[0].trace[-1].outcome.startswith("CRITICAL bypasses quiet hours, digest, throttle")
    # without the throttle bypass, CRITICAL is still throttled
    strict = {**values, "notifications.critical_bypass_throttle": False}
    evaluation = evaluate(SUBJECT, make_event(at=NIGHT), settings_of(strict), {}, NIGHT)
    assert evaluation.needs_throttle
    assert answer(finish(evaluation, False, ThrottleState()), Channel.EMAIL) == (Action.SUPPRESS, Reason.THROTTLED)
    # nothing to bypass: ALLOWED; and the request's priority wins over the rule's
    plain = decide(priority=Priority.CRITICAL)
    assert plain.priority is Priority.CRITICAL and plain.channels[0].reason is Reason.ALLOWED
    low = decide(throttled_rules("CRITICAL"), priority=Priority.LOW)
    assert low.priority is Priority.LOW


def test_trace_names_the_deciding_layer_and_version() -> None:
    values = {"notifications.email.enabled": resolved("notifications.email.enabled", False, Layer.ORG, 7)}
    evaluation = evaluate(SUBJECT, make_event(), values, {}, AT)
    email = evaluation.channels[0]
    deciding = email.trace[-1]
    assert (deciding.rule, deciding.key) == ("channel", "notifications.email.enabled")
    assert deciding.source is not None
    assert (deciding.source.layer, deciding.source.version, deciding.source.scope) == (Layer.ORG, 7, SCOPES[Layer.ORG])
    assert [step.rule for step in email.trace] == ["event_rule", "conditions", "channel"]
    # an undefined key says so
    assert evaluation.channels[1].trace[2].source is None
    assert evaluation.channels[1].trace[2].outcome.endswith("(undefined: default)")


GRANTED_UNTIL_TOMORROW = {"marketing_email": consent(ConsentStatus.GRANTED, AT + timedelta(days=1))}
NEEDS_CONSENT = {"notifications.consent_purposes": {"trading": "marketing_email"}}
EVERY_REASON: dict[Reason, tuple[dict[str, Any], dict[str, ConsentEntry], dict[str, Any], bool]] = {
    Reason.ALLOWED: ({}, {}, {}, True),
    Reason.CHANNEL_DISABLED: ({"notifications.email.enabled": False}, {}, {}, True),
    Reason.CATEGORY_DISABLED: ({"notifications.categories.trading": False}, {}, {}, True),
    Reason.EVENT_DISABLED: ({"notifications.event_rules": {"LARGE_LOSS": {"enabled": False}}}, {}, {}, True),
    Reason.CONDITION_NOT_MET: ({"notifications.event_rules": SEED_RULES}, {}, {"data": {}}, True),
    Reason.QUIET_HOURS: (QUIET_ON, {}, {"at": NIGHT}, True),
    Reason.DIGEST: ({"notifications.frequency": "weekly"}, {}, {}, True),
    Reason.THROTTLED: (throttled_rules(), {}, {}, False),
    Reason.CONSENT_MISSING: (NEEDS_CONSENT, {}, {}, True),
    Reason.CONSENT_WITHDRAWN: (NEEDS_CONSENT, {"marketing_email": consent(ConsentStatus.WITHDRAWN)}, {}, True),
    Reason.CONSENT_EXPIRED: (NEEDS_CONSENT, GRANTED_UNTIL_TOMORROW, {"at": AT + timedelta(days=2)}, True),
    Reason.NO_ADDRESS: ({}, {}, {"channels": (Channel.SMS,)}, True),
    Reason.CRITICAL_BYPASS: (QUIET_ON, {}, {"at": NIGHT, "priority": Priority.CRITICAL}, True),
}


def test_every_reason_has_a_scenario() -> None:
    assert set(EVERY_REASON) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason(reason: Reason) -> None:
    values, consents, event, allowed = EVERY_REASON[reason]
    decision = decide(values, consents, allowed, **event)
    expected = Action.SEND_NOW if reason in (Reason.ALLOWED, Reason.CRITICAL_BYPASS) else Action.SUPPRESS
    expected = {Reason.QUIET_HOURS: Action.DEFER, Reason.DIGEST: Action.DIGEST}.get(reason, expected)
    first = decision.channels[0]
    assert (first.action, first.reason) == (expected, reason)


def test_event_rules_validation() -> None:
    assert event_rules_problems(SEED_RULES) == []
    assert event_rules_problems({}) == []
    old_default = {
        "TRADE_EXECUTED": {
            "enabled": True,
            "channels": ["IN_APP", "PUSH"],
            "priority": "MEDIUM",
            "throttle_minutes": 0,
            "conditions": {},
        },
        "SIGNAL_GENERATED": {
            "enabled": False,
            "channels": ["IN_APP"],
            "priority": "LOW",
            "throttle_minutes": 15,
            "conditions": {"confidence": {"min": 0.8}},
        },
    }
    assert event_rules_problems(old_default) == []
    bad = {
        "A": {"enabled": "yes"},
        "B": {"channels": ["EMAIL", "FAX"]},
        "C": {"channels": "EMAIL"},
        "D": {"priority": "URGENT"},
        "E": {"throttle_minutes": 10081},
        "F": {"throttle_limit": 0},
        "G": {"throttle_minutes": True},
        "H": {"conditions": {"a..b": {"min": 1}}},
        "I": {"conditions": {"x": {"gt": 1}}},
        "J": {"throttle_minute": 5},
        "K": [],
        "L": {"channels": ["SMS", "SMS"]},
        "": {},
        "x" * 129: {},
    }
    problems = event_rules_problems(bad)
    for fragment in [
        "A.enabled: must be a bool",
        "B.channels: unknown channels ['FAX']",
        "C.channels: must be a list",
        "D.priority: must be one of LOW, MEDIUM, HIGH, CRITICAL",
        "E.throttle_minutes: must be an int in 0..10080",
        "F.throttle_limit: must be an int in 1..10000",
        "G.throttle_minutes",
        "H.conditions.'a..b'",
        "I.conditions.x: unknown operator 'gt'",
        "J.'throttle_minute': unknown field",
        "K.must be an object",
        "L.channels: must not repeat",
        "'': event types must be 1-128",
    ]:
        assert any(problem.startswith(fragment) for problem in problems), (fragment, problems)
    assert len(problems) == 14
    assert event_rules_problems([]) == ["must be an object of event type -> rule"]


rule_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20000) | st.sampled_from(["EMAIL", "SMS", "HIGH", "x", "a.b"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["enabled", "channels", "priority", "throttle_minutes", "throttle_limit", "conditions", "a", "min"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    rule=rule_values, data=st.dictionaries(st.sampled_from(["a", "loss_amount"]), st.integers() | st.text(max_size=3))
)
def test_any_stored_rule_gives_a_decision(rule: Any, data: dict[str, Any]) -> None:
    values = settings_of({"notifications.event_rules": {"LARGE_LOSS": rule}, **QUIET_ON})
    evaluation: Evaluation = evaluate(SUBJECT, make_event(data=data, at=NIGHT), values, {}, NIGHT)
    decision = finish(evaluation, False, ThrottleState())
    assert len(decision.channels) == len(ALL_CHANNELS)
    for channel in decision.channels:
        assert channel.trace
        if channel.action in (Action.DEFER, Action.DIGEST):
            assert channel.deliver_after is not None and channel.deliver_after > NIGHT
        if channel.action is Action.SEND_NOW:
            assert evaluation.throttle is None
