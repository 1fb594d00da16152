"""Prepared decisions: the wire form equals the message form, an answer holds until its schedule boundary,
and the memo forgets what a change touches and stays within its byte budget."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prefd.v1 import notifications_pb2
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import GLOBAL_SCOPE, ChangeKind, Scope, ScopeKind, Subject
from prefd_server.notifications.convert import PRIORITIES, WireDecision, decision_to_pb
from prefd_server.notifications.decision_memo import DecisionMemo
from prefd_server.notifications.model import Channel, ConsentEntry, ConsentStatus, Event, LegalBasis, ThrottleState
from prefd_server.notifications.rules import Evaluation, evaluate, finish
from prefd_server.notifications.schedule import WEEKDAYS
from tests.notifications.test_rules import AT, SUBJECT, make_event, settings_of

THROTTLED_RULES = {
    "LARGE_LOSS": {
        "enabled": True,
        "channels": ["EMAIL", "PUSH", "IN_APP", "SMS"],
        "throttle_minutes": 60,
        "throttle_limit": 3,
        "conditions": {"loss_amount": {"min": 1000}},
    }
}
CHANNELS = (Channel.EMAIL, Channel.PUSH, Channel.IN_APP, Channel.SMS)
STATE = ThrottleState(3, 1, AT + timedelta(minutes=30), "redis")


def wire_equals_message(shared: Evaluation, own: Evaluation, allowed: bool, state: ThrottleState) -> None:
    """WireDecision's bytes of an evaluation shared with `own.subject` parse to the message decision_to_pb
    builds from finish() of the subject's own evaluation."""
    subject = own.subject
    wire = WireDecision(shared).decision(subject, allowed, state)
    expected_state = state if own.throttle is not None else ThrottleState()
    expected = decision_to_pb(finish(own, allowed, expected_state))
    got = notifications_pb2.Decision.FromString(wire)
    assert got == expected
    assert got.subject.user_id == subject.user_id


@settings(max_examples=150, deadline=None)
@given(
    quiet=st.booleans(),
    in_app_deferred=st.booleans(),
    frequency=st.sampled_from(["immediate", "hourly", "daily", "weekly"]),
    throttled=st.booleans(),
    allowed=st.booleans(),
    priority=st.sampled_from([None, *notifications_pb2.Priority.values()[1:]]),
    loss=st.sampled_from([10, 5000]),
    user=st.sampled_from(["u1", "u2", "someone-else"]),
)
def test_the_wire_form_is_the_message_form(
    quiet: bool,
    in_app_deferred: bool,
    frequency: str,
    throttled: bool,
    allowed: bool,
    priority: int | None,
    loss: int,
    user: str,
) -> None:
    values: dict[str, Any] = {
        "notifications.quiet_hours.enabled": quiet,
        "notifications.quiet_hours.start": "11:00",
        "notifications.quiet_hours.end": "13:00",
        "notifications.quiet_hours.defer_in_app": in_app_deferred,
        "notifications.frequency": frequency,
        "notifications.sms.phone_number": "+15550100",
        "locale.timezone": "Europe/Berlin",
    }
    if throttled:
        values["notifications.event_rules"] = THROTTLED_RULES
    event = make_event(channels=CHANNELS, data={"loss_amount": loss}, priority=PRIORITIES.get(priority or 0))
    evaluation = evaluate(SUBJECT, event, settings_of(values), {}, AT)
    # The subject the evaluation was made for, or another with the same settings (its digest keys differ).
    own = evaluate(Subject(user, "o1"), event, settings_of(values), {}, AT)
    wire_equals_message(evaluation, own, allowed, STATE)


def test_a_refused_throttle_suppresses_exactly_the_channels_that_would_send_now() -> None:
    values = {"notifications.event_rules": THROTTLED_RULES, "notifications.push.enabled": False}
    evaluation = evaluate(SUBJECT, make_event(channels=CHANNELS), settings_of(values), {}, AT)
    decision = notifications_pb2.Decision.FromString(WireDecision(evaluation).decision(SUBJECT, False, STATE))
    actions = {c.channel: (c.action, c.reason) for c in decision.channels}
    throttled = (notifications_pb2.ACTION_SUPPRESS, notifications_pb2.REASON_THROTTLED)
    assert actions[notifications_pb2.CHANNEL_EMAIL] == throttled
    assert actions[notifications_pb2.CHANNEL_PUSH] == (
        notifications_pb2.ACTION_SUPPRESS,
        notifications_pb2.REASON_CHANNEL_DISABLED,
    )
    assert decision.trace[-1].rule == "throttle" and "exceeded" in decision.trace[-1].outcome
    assert decision.throttle.remaining == 1 and decision.throttle.store == "redis"


# --- an answer holds until its schedule boundary ------------------------------------------------------


def outcome(evaluation: Evaluation) -> tuple[Any, ...]:
    """Everything a decision says, but the evaluation time."""
    decision = finish(evaluation, True, ThrottleState())
    channels = [
        (c.channel, c.action, c.reason, c.deliver_after, c.digest_key, tuple(s.outcome for s in c.trace))
        for c in decision.channels
    ]
    return (*channels, tuple(s.outcome for s in decision.trace))


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(["America/New_York", "Europe/Berlin", "Asia/Kolkata", "UTC"]),
    minute=st.integers(0, 366 * 24 * 60),
    start=st.sampled_from(["00:00", "01:30", "02:30", "07:00", "22:00", "23:45"]),
    end=st.sampled_from(["00:00", "02:15", "03:00", "07:00", "22:30"]),
    days=st.lists(st.sampled_from(WEEKDAYS), unique=True),
    frequency=st.sampled_from(["immediate", "hourly", "daily", "weekly"]),
    fraction=st.floats(0, 1, exclude_max=True),
)
def test_an_answer_holds_until_its_schedule_boundary_and_not_after(
    zone: str, minute: int, start: str, end: str, days: list[str], frequency: str, fraction: float
) -> None:
    values = {
        "locale.timezone": zone,
        "notifications.quiet_hours.enabled": True,
        "notifications.quiet_hours.start": start,
        "notifications.quiet_hours.end": end,
        "notifications.quiet_hours.days": days,
        "notifications.frequency": frequency,
        "notifications.digest.time": "02:30",
    }
    read = settings_of(values)
    at = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minute, seconds=17)

    def at_time(moment: datetime) -> Evaluation:
        return evaluate(SUBJECT, make_event(at=moment), read, {}, moment)

    first = at_time(at)
    boundary = first.schedule_changes_at
    if boundary is None:  # quiet hours never open (no day, or an empty window) and sends are immediate
        assert (not days or start == end) and frequency == "immediate"
        assert outcome(at_time(at + timedelta(days=8))) == outcome(first)
        return
    assert boundary > at
    last = boundary - timedelta(microseconds=1)
    for moment in (min(at + (boundary - at) * fraction, last), last):
        assert outcome(at_time(moment)) == outcome(first), moment
    assert outcome(at_time(boundary)) != outcome(first)


def test_a_consent_expiry_bounds_the_answer() -> None:
    expires = AT + timedelta(hours=2)
    granted = ConsentEntry("u1", "marketing", LegalBasis.CONSENT, ConsentStatus.GRANTED, entry_id=7, expires_at=expires)
    values = {"notifications.consent_purposes": {"trading": "marketing"}}
    evaluation = evaluate(SUBJECT, make_event(), settings_of(values), {"marketing": granted}, AT)
    assert evaluation.consent_changes_at == expires
    event = make_event(at=expires, channels=(Channel.EMAIL, Channel.PUSH))
    later = evaluate(SUBJECT, event, settings_of(values), {"marketing": granted}, expires)
    assert later.consent_changes_at is None
    assert {c.reason.value for c in finish(later, True, ThrottleState()).channels} == {"CONSENT_EXPIRED"}


# --- the memo ---------------------------------------------------------------------------------------


def memo_with(commits: LocalCommits, budget: int = 1 << 20) -> DecisionMemo[str]:
    return DecisionMemo(commits, budget)


def remember(
    memo: DecisionMemo[str], subject: Subject, answer: str, paths: tuple[str, ...] = ("loss_amount",)
) -> Event:
    event = make_event()
    memo.put(subject, event, False, paths, (answer, 100, float("inf")), memo.tick)
    return event


def lookup(memo: DecisionMemo[str], subject: Subject, event: Event, now_s: float = 0.0) -> str | None:
    key = memo.key(subject, event, False)
    return None if key is None else memo.get(key, now_s)


def change(kind: ChangeKind, scope: Scope) -> ChangeEvent:
    return ChangeEvent(1, 1, kind, scope, "k", None, None, 1, "tester", AT)


def test_the_memo_keys_on_the_values_the_conditions_read() -> None:
    memo = memo_with(LocalCommits())
    event = remember(memo, SUBJECT, "big loss")
    assert lookup(memo, SUBJECT, event) == "big loss"
    # Other data fields do not matter; another value at a condition's path, or an absent one, does.
    assert lookup(memo, SUBJECT, replace(event, data={"loss_amount": 5000, "symbol": "ACME"})) == "big loss"
    assert lookup(memo, SUBJECT, replace(event, data={"loss_amount": 10})) is None
    assert lookup(memo, SUBJECT, replace(event, data={})) is None
    assert lookup(memo, SUBJECT, replace(event, category="other")) is None
    assert lookup(memo, Subject("u1", "o2"), event) is None


def test_an_answer_is_not_used_past_its_validity() -> None:
    memo = memo_with(LocalCommits())
    event = make_event()
    memo.put(SUBJECT, event, False, (), ("until 100", 10, 100.0), memo.tick)
    key = memo.key(SUBJECT, event, False)
    assert memo.get(key, 99.9) == "until 100"
    assert memo.get(key, 100.0) is None


def test_changes_forget_what_they_touch() -> None:
    commits = LocalCommits()
    memo = memo_with(commits)
    other = Subject("u2", "o1")
    stranger = Subject("u3", "o9")
    for subject in (SUBJECT, other, stranger):
        remember(memo, subject, subject.user_id)
    event = make_event()
    commits.committed(ChangeKind.CONSENT, Scope(ScopeKind.USER, "u1"), 5)
    assert lookup(memo, SUBJECT, event) is None and lookup(memo, other, event) == "u2"
    memo.on_changes([change(ChangeKind.PREFERENCE, Scope(ScopeKind.ORG, "o1"))])
    assert lookup(memo, other, event) is None and lookup(memo, stranger, event) == "u3"
    memo.on_changes([change(ChangeKind.AI_CONFIG, GLOBAL_SCOPE)])  # not read by a decision
    assert lookup(memo, stranger, event) == "u3"
    commits.committed(ChangeKind.DEFINITION, GLOBAL_SCOPE, 6)
    assert lookup(memo, stranger, event) is None
    remember(memo, stranger, "again")
    memo.on_changes([change(ChangeKind.ERASURE, Scope(ScopeKind.USER, "pseudonym"))])
    assert lookup(memo, stranger, event) is None


def test_an_answer_begun_before_a_change_is_not_kept() -> None:
    commits = LocalCommits()
    memo = memo_with(commits)
    began = memo.tick
    commits.committed(ChangeKind.PREFERENCE, Scope(ScopeKind.USER, "elsewhere"), 9)
    event = make_event()
    memo.put(SUBJECT, event, False, (), ("stale", 10, float("inf")), began)
    assert memo.key(SUBJECT, event, False) is None


def test_the_memo_stays_within_its_budget() -> None:
    memo = memo_with(LocalCommits(), budget=64 * 1024)
    for n in range(2000):
        remember(memo, Subject(f"user-{n}", "o1"), "x", ())
        memo.put(Subject(f"user-{n}", "o1"), make_event(), False, (), ("x", 1000, float("inf")), memo.tick)
    assert memo.bytes <= 64 * 1024 + 64 * 1024 // 8
    assert lookup(memo, Subject("user-1999", "o1"), make_event()) == "x"
    assert lookup(memo, Subject("user-0", "o1"), make_event()) is None
